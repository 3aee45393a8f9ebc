"""launcher: train a plain PyTorch recipe on one CPU, a workstation or a SLURM cluster."""
__version__ = "0.1.0"
