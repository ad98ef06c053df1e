"""Methods that ask the oracle annotator for labels (active test-time adaptation, issue 20): an honest one, and the
ways a method can ask for more than it may have. The edge uploads every sample's input and awaits the cloud's
answers; the cloud answers each labelled row with its label (a one-hot row of logits) and every other row with class
0, so a cell's accuracy says how many labels arrived and whether they were right.

``ask`` chooses what the cloud asks for in each batch: ``first`` (the first ``count`` rows), ``beyond`` (``count``
rows, whatever the budget), ``outside`` (a row past the upload's end), ``repeat`` (row 0 twice), ``floats`` (rows as a
float tensor), ``odd`` (the upload's odd rows, at most ``count``), ``least-sure`` (the ``count`` rows whose
foundation-model prediction is least sure), ``moves-index`` (the first ``count`` rows, after shifting the upload's
index onto the next batch's samples at batch 0, and shifting it back in the step), ``exits`` (sys.exit), ``subclass``
(the first ``count`` rows as a tensor subclass), ``huge`` (ten million rows more than the upload has),
``forges-count`` (the first ``count`` rows, and in its step it walks the stack to the loop's devices and zeroes their
label count and what their annotators delivered). ``index`` chooses what the edge uploads: ``all`` (every sample),
``outside`` (every sample, at batch 0 the last under an index past the batch's end), ``repeat`` (every sample, at
batch 0 row 0 under index 0 twice), or ``odd`` (only the odd rows of every batch, the edge predicting class 0 for the
rest).

``asks-for-box-labels`` is the same cloud on a detector: it answers with the foundation model's detections and asks
for the label of the first uploaded sample, which a detection dataset does not have."""
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cemabench.method import CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method, option


class _UploadAll(EdgeLogic):
    def __init__(self, index: str = "all"):
        self.index, self.batch = index, 0

    def step(self, model, x):
        if self.index == "odd":  # the odd rows go up; the edge predicts class 0 for the rest
            logits = torch.zeros(len(x), model(x).shape[1])
            logits[:, 0] = 1.0
            return EdgeDecision(logits=logits, upload=torch.arange(1, len(x), 2), await_answers=True)
        index = torch.arange(len(x))
        if self.batch == 0 and self.index == "outside":
            index[-1] = len(x) + 50
        elif self.batch == 0 and self.index == "repeat":
            index[1] = 0
        self.batch += 1
        return EdgeDecision(logits=None, upload=index, await_answers=True)


class _Subclass(torch.Tensor):
    pass


class _AnswerWithLabels(CloudLogic):
    def __init__(self, ask: str, count: int, classes: int, foundation=None):
        self.ask, self.count, self.classes, self.foundation = ask, count, classes, foundation
        self.moved = 0

    def labels_wanted(self, upload):
        n = len(upload)
        if self.ask == "moves-index" and upload.batch_index == 0:
            upload.index += n  # in place: the harness's own tensor, in-process
            self.moved = n
        if self.ask == "exits":
            sys.exit(3)
        if self.ask == "least-sure":  # the rows the foundation model is least sure of (its FLOPs are the cloud's)
            with torch.no_grad():
                margin = self.foundation(upload.samples).softmax(1).max(1).values
            return margin.argsort()[:self.count].sort().values
        return {"first": lambda: torch.arange(min(self.count, n)),
                "moves-index": lambda: torch.arange(min(self.count, n)),
                "forges-count": lambda: torch.arange(min(self.count, n)),
                "huge": lambda: torch.arange(n + 10_000_000),
                "odd": lambda: torch.arange(1, n, 2)[:self.count],
                "subclass": lambda: torch.arange(min(self.count, n)).as_subclass(_Subclass),
                "beyond": lambda: torch.arange(min(self.count, n)),
                "outside": lambda: torch.tensor([n]),
                "repeat": lambda: torch.tensor([0, 0]),
                "floats": lambda: torch.arange(min(self.count, n)).double()}[self.ask]()

    def step(self, upload):
        if self.moved:
            upload.index -= self.moved
            self.moved = 0
        if self.ask == "forges-count":
            frame = sys._getframe(1)
            while frame is not None:
                devices = frame.f_locals.get("devices")
                for device in devices if isinstance(devices, list) else ():
                    if hasattr(device, "annotator") and hasattr(device, "result"):
                        device.annotator.used = device.result.labels_used = 0
                frame = frame.f_back
        answers = torch.zeros(len(upload), self.classes)
        answers[:, 0] = 1.0
        if upload.labels is not None and len(upload.labels):
            answers[upload.labelled] = F.one_hot(upload.labels, self.classes).float() * 2
        return CloudReply(answers=answers)


class AsksForLabels(Method):
    name = "asks-for-labels"
    uses_labels = True

    @dataclass
    class Options:
        ask: str = option("first", choices=("first", "beyond", "outside", "repeat", "floats", "moves-index", "exits",
                                            "subclass", "least-sure", "odd", "forges-count", "huge"))
        count: int = option(2, low=0)
        index: str = option("all", choices=("all", "outside", "repeat", "odd"))

    def edge(self, num_classes):
        return _UploadAll(self.options.index)

    def cloud(self, resources):
        foundation = resources.foundation().eval() if self.options.ask == "least-sure" else None
        return _AnswerWithLabels(self.options.ask, self.options.count, resources.num_classes, foundation)


class _AnswerWithBoxes(CloudLogic):
    def __init__(self, foundation):
        self.foundation = foundation.eval()

    def labels_wanted(self, upload):
        return torch.arange(min(1, len(upload)))

    @torch.no_grad()
    def step(self, upload):
        return CloudReply(answers=self.foundation(upload.samples))


class AsksForBoxLabels(Method):
    name = "asks-for-box-labels"
    uses_labels = True
    tasks = ("classification", "detection")

    def edge(self, num_classes):
        return _UploadAll()

    def cloud(self, resources):
        return _AnswerWithBoxes(resources.foundation())
