"""`launcher new NAME [--dir DIR]`: a recipe and its config that train as written."""
from __future__ import annotations

import argparse
import importlib.util
import keyword
import shlex
import string
import sys
from pathlib import Path

from .errors import ConfigError

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Always refused, installed or not: a recipe file is imported under its own name as a
# top-level module (and its directory goes on sys.path), so it would hide these.
RESERVED = {"launcher", "recipes", "torch"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the recipe's name, a Python identifier that is not the name of a module "
                   "(torch, json, ...): NAME.py and NAME.yaml are written")
    p.add_argument("--dir", default=".", help="where to write them, created if needed (default: the working "
                   "directory); run it from there: its run_dir is runs/NAME")


def cmd_new(args) -> int:
    name, folder = args.name, Path(args.dir)
    check_name(name, folder)
    files = {folder / f"{name}.py": render("recipe.py.tmpl", name),
             folder / f"{name}.yaml": render("config.yaml.tmpl", name)}
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise ConfigError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                          "launcher new does not overwrite; choose another NAME or --dir, or remove it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--dir {folder} cannot be created ({e.strerror or e})") from None
    written: list[Path] = []
    try:
        for path, text in files.items():
            with open(path, "x", encoding="utf-8") as f:  # "x": never clobber a file made meanwhile
                f.write(text)
            written.append(path)
    except OSError as e:
        for path in written:  # all or nothing
            path.unlink(missing_ok=True)
        raise ConfigError(f"{e.filename} cannot be written ({e.strerror or e})") from None
    py, cfg = files
    width = max(len(str(py)), len(str(cfg)))
    print(f"wrote {str(py):{width}}  the recipe: Config, model, data, loss, eval_step (its comments explain each)")
    print(f"wrote {str(cfg):{width}}  its config")
    cd = "" if folder.resolve() == Path.cwd().resolve() else f"cd {shlex.quote(str(folder))} && "
    print(f"next:  {cd}launcher run {shlex.quote(cfg.name)}")
    return 0


def check_name(name: str, folder: Path) -> None:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(f"recipe name `{name}` is not a Python identifier (letters, digits and underscores, "
                          f"not starting with a digit, not a keyword): try `{suggest(name)}`")
    shadowed = shadows(name, folder)
    if shadowed:
        raise ConfigError(f"recipe name `{name}` would shadow {shadowed}: a recipe file is imported as a "
                          f"top-level module of its own name. Choose another, such as `my_{name}`")


def shadows(name: str, folder: Path) -> str | None:
    """What module NAME would hide, or None."""
    if name in RESERVED:
        return f"the module `{name}` that launcher uses or ships"
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        return f"the standard library's `{name}`"
    # The working directory and DIR are left out: a NAME.py there is the file we refuse to overwrite.
    here = {Path.cwd().resolve(), folder.resolve()}
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() not in here]
    try:
        spec = importlib.util.find_spec(name)  # meta path finders too: editable installs live there
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.path[:] = saved
    if spec is not None and spec.origin:  # no origin: a namespace package, any directory of that name
        return f"the installed module `{name}` ({spec.origin})"
    return None


def suggest(name: str) -> str:
    fixed = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "my_recipe"
    if fixed[0].isdigit() or keyword.iskeyword(fixed):
        fixed = "my_" + fixed
    return fixed if fixed.isidentifier() else "my_recipe"


def render(template: str, name: str) -> str:
    return string.Template((TEMPLATES / template).read_text(encoding="utf-8")).substitute(name=name)
