"""The soak script: repeated complete runs per strategy through the real CLI must all
pass (exit 0, final checkpoint, final validation row). A rare failure (a crash at
exit one run in ten) is what it is for; see scripts/soak.py."""
import importlib.util
import re
import subprocess
import sys

import pytest

from helpers import ROOT, worker_env

# A subset: each deepspeed process takes ~10 s to import (zero2 only where deepspeed is installed).
STRATEGIES = ["ddp", "fsdp"] + (["zero2"] if importlib.util.find_spec("deepspeed") else [])


@pytest.mark.slow
def test_soak(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--runs", "2", "--strategies", ",".join(STRATEGIES),
         "--out", str(tmp_path / "soak")],
        cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=1800)
    output = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-8000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    # The table: strategy, runs, non-zero exits, other failures, median seconds.
    rows = {}
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)", line.strip())
        if match:
            rows[match.group(1)] = tuple(int(match.group(i)) for i in (2, 3, 4))
    assert set(rows) == set(STRATEGIES), output
    for name, (runs, nonzero, other) in rows.items():
        assert (runs, nonzero, other) == (2, 0, 0), f"{name}: {runs} runs, {nonzero} non-zero exits, " \
                                                    f"{other} other failures\n{output}"
