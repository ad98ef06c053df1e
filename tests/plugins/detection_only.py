"""A method that declares detection only."""
from cemabench.method import EdgeDecision, EdgeLogic, Method


class _Predict(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision.predicting(model(x))


class DetectsOnly(Method):
    """Runs the edge detector; declares no classification."""

    name = "detects-only"
    tasks = ("detection",)
    task_reason = "it predicts boxes, and a classifier's logits are none"

    def edge(self, num_classes):
        return _Predict()
