"""A model plugin of the test distribution: the miniature's networks under a zoo name of its own."""
from cemabench.models.mini import load_model


def plugin_model(name: str):
    return load_model(name)
