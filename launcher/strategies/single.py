"""One process, one device: the base behaviour as it is."""
from .base import Strategy


class SingleStrategy(Strategy):
    name = "single"
