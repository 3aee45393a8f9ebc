"""A recipe without data()."""
from recipes.digits import Config, loss, model  # noqa: F401
