"""Exit codes and the errors that end a run with them (docs/design.md, Exit codes)."""

DONE = 0  # the run finished and wrote everything
FAILED = 1  # training failed (a traceback, or one of the TrainingErrors below)
BAD_INPUT = 2  # config, CLI, recipe contract: found before any worker starts where it can be
STOPPED = 3  # SIGTERM / SIGUSR1: a checkpoint was saved; run the same command again to resume


class ConfigError(Exception):
    """Bad input from the user: reported in one paragraph, exit code 2, no traceback."""


class TrainingError(RuntimeError):
    """A failure during training whose message says it all: reported without a traceback, exit 1."""


class NonFiniteError(TrainingError):
    pass


class CheckpointWriteError(TrainingError):
    pass


class Stopped(Exception):
    """A stop signal arrived and the checkpoint is saved."""
