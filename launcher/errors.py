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

    def __init__(self, signal_name: str = "a signal"):
        super().__init__(signal_name)
        self.signal_name = signal_name


def exit_now(code: int) -> None:
    """The one way out of a launcher process: flush stdout and stderr, then os._exit, skipping
    interpreter finalization (docs/design.md, Process exit)."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)
