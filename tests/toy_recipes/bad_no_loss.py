"""A recipe without loss() (and not a Lightning-shaped model)."""
from recipes.digits import Config, data, model  # noqa: F401
