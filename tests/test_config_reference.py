"""The README's config reference is the schema's: generated, and checked here for drift."""
import subprocess
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import config_reference  # noqa: E402


def test_readme_reference_matches_the_schema():
    block = config_reference.readme_block((ROOT / "README.md").read_text())
    assert block is not None, "README.md lost its config reference markers"
    assert block == config_reference.reference(), (
        "README.md's config reference is out of date: run `python scripts/config_reference.py --write`")


def test_every_field_has_help():
    missing = [key for key, _, _, help_text in config_reference.rows(config_reference.Config) if not help_text]
    assert not missing, f"fields without a Field(description=...): {missing}"


def test_the_reference_names_every_key_a_config_can_set():
    keys = {key for key, *_ in config_reference.rows(config_reference.Config)}
    assert {"train.global_batch_size", "checkpoint.async", "log.wandb.project", "recipe"} <= keys


def test_run_help_says_where_the_reference_is():
    out = subprocess.run([sys.executable, "-m", "launcher", "run", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "README.md" in out and "config reference" in out.lower()
