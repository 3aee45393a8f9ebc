"""recipes.gpt without its init_weights: the launcher then fills the shards from the one whole model
that rank 0 builds in host memory (scripts/bench.py --memory, tests/test_build.py)."""
from recipes.gpt import Config, data, eval_step, flops_per_sample, loss, model, tokens_per_sample  # noqa: F401
