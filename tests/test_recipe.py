"""The recipe contract."""
import pytest

from helpers import check, digits_config, losses, metrics, run, write_config
from launcher.config import ConfigError
from launcher.recipe import Recipe


def write_recipe(tmp_path, body: str):
    path = tmp_path / "my_recipe.py"
    path.write_text(body)
    return path


def test_missing_function_is_named(tmp_path):
    path = write_recipe(tmp_path, "def model(cfg):\n    import torch\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(ConfigError) as e:
        Recipe.load({"name": str(path)})
    assert "data, loss" in str(e.value)


def test_import_error_shows_the_recipes_own_traceback(tmp_path):
    path = write_recipe(tmp_path, "import math\n\nvalue = math.sqrt(-1)  # the user's bug\n")
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe={"name": str(path)}))
    proc = run(["run", cfg], cwd=tmp_path)
    assert proc.returncode == 2
    assert "math domain error" in proc.stderr and "my_recipe.py" in proc.stderr and "value = math.sqrt(-1)" in proc.stderr


def test_unknown_recipe_module(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Recipe.load({"name": "recipes.nonexistent"})


def test_recipe_by_file_path_trains(tmp_path):
    body = (
        "from recipes.digits import Config, model, data, loss\n"
    )
    path = write_recipe(tmp_path, body)
    cfg = write_config(tmp_path / "c.yaml", digits_config(tmp_path / "run", recipe={"name": str(path), "hidden": 16}))
    check(run(["run", cfg], cwd=tmp_path))
    assert len(losses(tmp_path / "run")) == 20


def test_recipe_config_fields_are_set_from_the_config():
    recipe = Recipe.load({"name": "recipes.digits", "hidden": 17, "depth": 1})
    assert recipe.cfg.hidden == 17 and recipe.cfg.depth == 1
    assert recipe.build_model()[0].out_features == 17


def test_lightning_shaped_model_trains(tmp_path):
    """training_step is the loss, configure_optimizers the optimizer, validation_step the metrics."""
    recipe = Recipe.load({"name": "toy_recipes.lightning_style"})  # no loss() in that module: accepted
    assert recipe.module.__name__ == "toy_recipes.lightning_style"
    cfg = write_config(tmp_path / "c.yaml", digits_config(
        tmp_path / "run", recipe={"name": "toy_recipes.lightning_style", "lr": 1e-2},
        optim={"name": "sgd", "lr": 1e-9},  # ignored: configure_optimizers() wins
        train={"max_steps": 60}))
    check(run(["run", cfg]))
    train_rows, val_rows = metrics(tmp_path / "run")
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert train_rows[0]["lr"] == pytest.approx(1e-2)
    assert val_rows[-1]["accuracy"] > 0.8


def test_a_recipe_file_imports_the_modules_beside_it_and_resolves_beside_the_config(tmp_path):
    """Like a script: `from mymodel import build` finds mymodel.py next to the recipe, and a
    relative recipe path is looked for beside the config first, whatever the working directory."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodel.py").write_text(
        "from torch import nn\n\ndef build(hidden):\n"
        "    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))\n")
    (project / "myrecipe.py").write_text(
        "from mymodel import build\nfrom recipes.digits import Config, data, loss\n\n"
        "def model(cfg):\n    return build(cfg.hidden)\n")
    cfg = write_config(project / "c.yaml", digits_config(tmp_path / "run", recipe={"name": "myrecipe.py",
                                                                                   "hidden": 32}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check(run(["run", cfg, "train.max_steps=3"], cwd=elsewhere))
    assert [r["step"] for r in metrics(tmp_path / "run")[0]] == [1, 2, 3]
    proc = run(["run", cfg, "recipe.name=missing.py"], cwd=elsewhere)
    assert proc.returncode == 2
    assert str(project / "missing.py") in proc.stderr and str(elsewhere / "missing.py") in proc.stderr


@pytest.mark.slow
def test_optimizer_and_scheduler_hooks_replace_the_config_and_resume(tmp_path):
    """optimizer(model, cfg) builds parameter groups by name; scheduler(optimizer, cfg, total_steps)
    steps every optimizer step and is saved in the checkpoint; the config's optim: and schedule:
    are reported as unused."""
    def cfg(name, steps):
        return write_config(tmp_path / f"{name}.yaml", digits_config(
            tmp_path / name, recipe={"name": "toy_recipes.hooks", "hidden": 32}, train={"max_steps": steps},
            optim={"name": "adamw", "lr": 5.0}, schedule={"warmup_steps": 4}, checkpoint={"every_steps": 4}))

    proc = check(run(["run", cfg("full", 8), "--nproc", 2]))
    assert "the config's optim: section is not used: the recipe's optimizer() takes its place" in proc.stderr
    assert "the config's schedule: section is not used: the recipe's scheduler() takes its place" in proc.stderr
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]  # StepLR(step_size=3, gamma=0.5), per step
    assert [r["lr"] for r in metrics(tmp_path / "full")[0]] == pytest.approx(expected)
    check(run(["run", cfg("resumed", 4)]))
    check(run(["run", cfg("resumed", 8)]))  # resumes at step 4, mid-schedule
    assert [r["lr"] for r in metrics(tmp_path / "resumed")[0]] == pytest.approx(expected)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    plan = run(["plan", cfg("full", 8)]).stdout
    assert "optimizer: the recipe's optimizer()" in plan and "schedule: the recipe's scheduler()" in plan
