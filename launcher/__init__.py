"""launcher: train a plain PyTorch recipe on one CPU, a workstation or a SLURM cluster."""
import time

__version__ = "0.1.0"
STARTED_AT = time.time()  # this process's start, near enough: for "first step after N s"
