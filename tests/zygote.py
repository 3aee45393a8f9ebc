"""A fork server for the tests' `launcher` commands (helpers.run): one process imports torch and launcher
once, then forks a child for each command, which runs `launcher.cli.entry()` as `python -m launcher` would.

Why: a `python -m launcher ...` spends about 1.5 s of CPU importing Python, torch and launcher before it
does anything, and the suite starts several hundred of them. A forked child starts with those modules in
memory. It is still a process of its own: its own pid, environment, working directory, stdout and stderr
(files, so torch's C++ output is caught too), exit code (os._exit, as the CLI leaves: docs/design.md,
Process exit), and anything it changes dies with it. A sitecustomize.py on the command's PYTHONPATH
runs in the child before the command, as it would at an interpreter's start. This process never runs a torch operation or starts
a thread, so that forking it is safe (OpenMP's pool and gloo's threads do not survive a fork).

Protocol, one JSON object a line on stdin, answered by one on stdout:
    {"argv": [...], "env": {...}, "cwd": DIR, "out": FILE, "err": FILE, "timeout": S}
 -> {"code": EXIT CODE (a negative signal number as subprocess reports it), "timed_out": bool}
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time


def child(request: dict) -> None:
    """In the forked child: become the command's process, run it, and leave with its exit code."""
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills it with whatever it started
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        path = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [p for p in path if p not in sys.path]
        for entry in path:  # the first sitecustomize on PYTHONPATH runs, as at an interpreter's start
            if os.path.isfile(os.path.join(entry, "sitecustomize.py")):
                runpy.run_path(os.path.join(entry, "sitecustomize.py"), run_name="sitecustomize")
                break
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT),
                                (2, request["err"], os.O_WRONLY | os.O_CREAT)):
            new = os.open(path, flags, 0o644)
            os.dup2(new, fd)
            os.close(new)
        sys.stdin = open(0, closefd=False)
        sys.argv = ["launcher", *request["argv"]]
        started = time.time()  # "first step done N s after start": this command's start, not the zygote's
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] == "launcher" and hasattr(module, "STARTED_AT"):
                module.STARTED_AT = started
        from launcher.cli import entry

        entry()  # leaves through os._exit
    finally:
        os._exit(70)  # anything that got this far is a failure of the zygote, not of the command


def wait(pid: int, timeout: float) -> tuple[int, bool]:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(0.01)


def main() -> None:
    # What every command imports first, then what the training commands import (torch._dynamo: the first
    # optimizer's step imports it, about a second; the shipped recipes' scikit-learn data and Lightning,
    # where installed). Nothing here may run a torch operation or start a thread (see the docstring).
    import importlib.util
    import threading

    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.distributed.run  # noqa: F401
    import launcher.cli  # noqa: F401
    import launcher.plan  # noqa: F401
    import launcher.preflight  # noqa: F401
    import launcher.run  # noqa: F401
    import launcher.trainer  # noqa: F401

    for optional in ("sklearn.datasets", "lightning.pytorch"):
        if importlib.util.find_spec(optional.split(".")[0]) is not None:
            importlib.import_module(optional)
    if threading.active_count() != 1:
        raise SystemExit(f"tests/zygote.py: {threading.active_count()} threads after its imports: it cannot fork")
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        code, timed_out = wait(pid, request["timeout"])
        print(json.dumps({"code": code, "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
