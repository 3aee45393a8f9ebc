"""Config loading, overrides and the bad-input messages, and the CLI."""
import pytest
import yaml

from helpers import ROOT, run, write_config
from launcher.config import ConfigError, load_config, parse_override


def test_overrides_are_yaml_scalars_and_create_nested_keys(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", {"recipe": {"name": "recipes.digits"}})
    cfg = load_config(cfg_path, ["optim.lr=3e-4", "train.max_steps=7", "recipe.hidden=256",
                                 "data.shuffle=false", "train.grad_clip=null"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.recipe == {"name": "recipes.digits", "hidden": 256}
    assert cfg.data.shuffle is False
    assert cfg.train.grad_clip is None


def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("recipe: {name: recipes.digits}\noptim: {lr: 1e-3}\n")
    assert load_config(cfg_path).optim.lr == pytest.approx(1e-3)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


def test_unknown_key_names_key_file_and_closest(tmp_path):
    cfg_path = write_config(tmp_path / "typo.yaml", {"recipe": {"name": "recipes.digits"},
                                                     "train": {"global_bach_size": 32}})
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path)
    msg = str(e.value)
    assert "train.global_bach_size" in msg and str(cfg_path) in msg and "train.global_batch_size" in msg


def test_unknown_key_from_an_override_says_so(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", {"recipe": {"name": "recipes.digits"}})
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path, ["optim.learning_rate=0.1"])
    assert "override `optim.learning_rate=0.1`" in str(e.value)


def test_wrong_type_names_key_value_and_type(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", {"recipe": {"name": "recipes.digits"},
                                                  "train": {"epochs": "many"}})
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path)
    msg = str(e.value)
    assert "train.epochs" in msg and "'many'" in msg and "int" in msg


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yaml")


def cli_error(args, tmp_path):
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", {"recipe": {"name": "recipes.digits"}, "run_dir": str(tmp_path / "r"),
                                                  "optim": {"nmae": "sgd"}})
    err = cli_error(["run", cfg_path], tmp_path)
    assert "optim.nmae" in err and "optim.name" in err and str(cfg_path) in err
    err = cli_error(["run", cfg_path.with_name("missing.yaml")], tmp_path)
    assert "missing.yaml does not exist" in err
    ok_cfg = write_config(tmp_path / "ok.yaml", {"recipe": {"name": "recipes.digits"}, "run_dir": str(tmp_path / "r")})
    err = cli_error(["run", ok_cfg, "train.seed=abc"], tmp_path)
    assert "train.seed" in err and "'abc'" in err and "int" in err
    err = cli_error(["run", ok_cfg, "recipe.hiden=3"], tmp_path)
    assert "recipe.hiden" in err and "recipe.hidden" in err
    err = cli_error(["run", ok_cfg, "recipe.hidden=wide"], tmp_path)
    assert "recipe.hidden" in err and "'wide'" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing started


def test_help_explains_run_and_ls():
    out = run(["--help"]).stdout
    assert "launcher run CONFIG" in out and "launcher ls" in out and "key=value" in out
    out = run(["run", "--help"]).stdout
    assert "--nproc" in out and "overrides" in out


def test_ls_lists_recipes_and_configs_with_descriptions():
    proc = run(["ls"])
    assert proc.returncode == 0
    out = proc.stdout
    assert "recipes.digits" in out and "recipes.diabetes" in out and "configs/digits.yaml" in out
    digits_line = next(line for line in out.splitlines() if "recipes.digits" in line)
    assert "digits" in digits_line.split("recipes.digits", 1)[1].lower()


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.recipe_name.startswith("recipes."), path
        assert yaml.safe_load(path.read_text())  # and they are plain YAML


@pytest.mark.parametrize("override, module", [("log.wandb.project=demo", "wandb"), ("log.tensorboard=true", "tensorboard"),
                                              ("strategy=deepspeed", "deepspeed")])
def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch, override, module):
    import importlib.util

    from launcher import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    cfg = load_config(write_config(tmp_path / "c.yaml", {"recipe": {"name": "recipes.digits"},
                                                         "run_dir": str(tmp_path / "r")}), [override])
    with pytest.raises(ConfigError) as e:
        preflight.check_inputs(cfg, 2, "c.yaml")
    assert f"pip install 'launcher[{module}]'" in str(e.value)


def test_plan_prints_batch_math_and_memory(tmp_path):
    proc = run(["plan", ROOT / "configs" / "digits.yaml", "--nproc", 2, "train.micro_batch_size=16",
                f"run_dir={tmp_path / 'r'}"])
    assert proc.returncode == 0, proc.stderr
    assert "global batch 64 = micro 16 x 2 ranks x 2 accumulation" in proc.stdout
    assert "parameters: 26,122" in proc.stdout and "memory per rank" in proc.stdout
