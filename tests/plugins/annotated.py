"""Methods that ask the oracle annotator for labels (active test-time adaptation, issue 20): an honest one, and the
ways a method can ask for more than it may have. The edge uploads every sample's input and awaits the cloud's
answers; the cloud answers each labelled row with its label (a one-hot row of logits) and every other row with class
0, so a cell's accuracy says how many labels arrived and whether they were right.

``ask`` chooses what the cloud asks for in each batch: ``first`` (the first ``count`` rows), ``beyond`` (``count``
rows, whatever the budget), ``outside`` (a row past the upload's end), ``repeat`` (row 0 twice), ``floats`` (rows as a
float tensor)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cemabench.method import CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method, option


class _UploadAll(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(logits=None, upload=torch.arange(len(x)), await_answers=True)


class _AnswerWithLabels(CloudLogic):
    def __init__(self, ask: str, count: int, classes: int):
        self.ask, self.count, self.classes = ask, count, classes

    def labels_wanted(self, upload):
        n = len(upload)
        return {"first": lambda: torch.arange(min(self.count, n)),
                "beyond": lambda: torch.arange(min(self.count, n)),
                "outside": lambda: torch.tensor([n]),
                "repeat": lambda: torch.tensor([0, 0]),
                "floats": lambda: torch.arange(min(self.count, n)).double()}[self.ask]()

    def step(self, upload):
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
        ask: str = option("first", choices=("first", "beyond", "outside", "repeat", "floats"))
        count: int = option(2, low=0)

    def edge(self, num_classes):
        return _UploadAll()

    def cloud(self, resources):
        return _AnswerWithLabels(self.options.ask, self.options.count, resources.num_classes)
