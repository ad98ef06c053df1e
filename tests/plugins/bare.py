"""Method plugins written from the plugin API alone: no name, paper or mapping; and one without an edge half."""
from cemabench.method import EdgeDecision, EdgeLogic, Method


class _Predict(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(model(x))


class Bare(Method):
    """Only the edge half: predicts with the source model."""

    def edge(self, num_classes):
        return _Predict()


class Edgeless(Method):
    """Forgets the edge half that every method needs."""
