"""A recipe whose data() raises: its data files are not there."""
from recipes.digits import Config, loss, model  # noqa: F401

SHARDS = "/nonexistent/bad_data_raises"


def data(cfg):
    with open(f"{SHARDS}/train.bin", "rb") as f:
        return f.read(), None
