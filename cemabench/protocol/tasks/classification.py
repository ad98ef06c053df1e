"""Classification: the edge predicts logits, (B, classes); an answer is one logits row per uploaded sample, charged at
its bytes; a domain's stream is scored by the top-1 accuracy of the predictions made at arrival (over the dataset's
``scored_classes`` only, where it names some: ImageNet-R's 200)."""
from __future__ import annotations

import numpy as np
import torch

from cemabench.protocol.scoring import finite
from cemabench.protocol.tasks.base import Task


class Classification(Task):
    name = "classification"

    def check(self, decision, batch):
        if decision.detections is not None:
            raise ValueError("EdgeDecision.detections is for detection datasets; on classification the edge predicts "
                             "EdgeDecision.logits")
        if decision.logits is not None and tuple(decision.logits.shape) != (batch, self.num_classes):
            raise ValueError(f"edge logits have shape {tuple(decision.logits.shape)}, expected ({batch}, "
                             f"{self.num_classes})")

    def own(self, decision, checks, batch_index):
        if decision.logits is None:
            return None
        return finite(decision.logits.float(), checks, f"non-finite logits at batch {batch_index} of the run unit")

    def answered(self, own, batch, upload, answers, link, batch_index, checks):
        """Samples with neither an edge prediction nor an answer get NaN logits (recorded as no prediction)."""
        expected = (len(upload), self.num_classes)
        if not torch.is_tensor(answers) or tuple(answers.shape) != expected:
            got = tuple(answers.shape) if torch.is_tensor(answers) else type(answers).__name__
            raise ValueError(f"the edge awaits answers for {expected[0]} uploaded samples, so the cloud must return "
                             f"CloudReply(answers=...) of shape {expected}; got {got}")
        on_time = link.answer(len(answers), answers.numel() * answers.element_size())
        out = (own.clone() if own is not None
               else torch.full((batch, self.num_classes), float("nan"), device=answers.device))
        if on_time:  # late answers do not count: the edge's own prediction (if any) stands
            message = f"the cloud's answers at batch {batch_index} of the run unit are not finite"
            out[upload.index.to(out.device)] = finite(answers.float(), checks, message).to(out.device)
        return out

    def record(self, prediction, batch):
        """The predicted class per sample, -1 where there is none (a row the cloud did not answer)."""
        if self.scored_classes is None:
            made = prediction.argmax(1)
        else:
            scored = self.scored_classes.to(prediction.device)
            made = scored[prediction[:, scored].argmax(1)]
        return torch.where(torch.isnan(prediction[:, 0]), -1, made)

    def score(self, result, block, records):
        if not records:
            return
        made = torch.cat(records).cpu().numpy()  # recorded on the device at arrival; read once, at the block's end
        hit = made == block.labels()[:len(made)].astype(np.int64)
        result.seen = len(made)
        result.correct = int(hit.sum())
        result.unanswered = int((made < 0).sum())
        domains = block.domain_of()
        if domains is not None:
            for name in dict.fromkeys(domains[:len(made)]):
                mine = domains[:len(made)] == name
                result.by_domain[name] = (int(mine.sum()), int(hit[mine].sum()))
