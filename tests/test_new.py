"""launcher new: a commented recipe and its config that train as written."""
import pytest

from helpers import check, metrics, run
from launcher.cli import main


def assert_learned(run_dir):
    train_rows, val_rows = metrics(run_dir)
    assert train_rows[-1]["loss"] < 0.4 * train_rows[0]["loss"], [r["loss"] for r in train_rows]
    assert val_rows and val_rows[-1]["accuracy"] > 0.8 and val_rows[-1]["val_loss"] < 0.5, val_rows


def test_new_recipe_trains_as_written(tmp_path):
    proc = check(run(["new", "my_task", "--dir", "proj"], cwd=tmp_path))
    assert "wrote proj/my_task.py" in proc.stdout and "wrote proj/my_task.yaml" in proc.stdout
    assert "next:  cd proj && launcher run my_task.yaml" in proc.stdout
    check(run(["run", "my_task.yaml"], cwd=tmp_path / "proj"))  # the printed command
    assert_learned(tmp_path / "proj" / "runs" / "my_task")


def test_new_in_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["new", "toy"]) == 0
    assert "next:  launcher run toy.yaml" in capsys.readouterr().out
    assert "name: toy.py" in (tmp_path / "toy.yaml").read_text()
    compile((tmp_path / "toy.py").read_text(), "toy.py", "exec")


@pytest.mark.parametrize("existing", ["thing.py", "thing.yaml"])
def test_refuses_to_overwrite(tmp_path, capsys, existing):
    (tmp_path / existing).write_text("mine\n")
    assert main(["new", "thing", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / existing} already exists" in err and "does not overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing written
    assert (tmp_path / existing).read_text() == "mine\n"


@pytest.mark.parametrize("name, says", [
    ("2fast", "not a Python identifier"), ("my-task", "try `my_task`"), ("class", "not a Python identifier"),
    ("torch", "would shadow"), ("launcher", "would shadow"), ("recipes", "would shadow"),
    ("json", "standard library"), ("numpy", "installed module"),
])
def test_bad_name(tmp_path, capsys, name, says):
    assert main(["new", name, "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"`{name}`" in err and says in err, err
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_new_recipe_trains_under_ddp(tmp_path):
    check(run(["new", "my_task"], cwd=tmp_path))
    check(run(["run", "my_task.yaml", "--nproc", "2", "strategy=ddp"], cwd=tmp_path))
    assert_learned(tmp_path / "runs" / "my_task")
