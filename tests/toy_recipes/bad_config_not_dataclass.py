"""A recipe whose Config is a plain class, not a @dataclass."""
from recipes.digits import data, loss, model  # noqa: F401


class Config:
    hidden = 32
