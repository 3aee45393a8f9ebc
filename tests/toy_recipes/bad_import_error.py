"""A recipe whose import raises: the user's own bug, shown with the user's own line."""
from recipes.digits import Config, data, loss, model  # noqa: F401

CLASSES = {"zero": 0, "one": 1}


def class_index(name):
    return CLASSES[name]


DEFAULT_CLASS = class_index("two")  # raises at import: there is no class "two"
