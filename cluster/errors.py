"""The CLI's error vocabulary: what counts as the user's mistake, and the exit codes.

Kept apart from ``cli.py`` so that every command module (and ``submit.py``) can raise
:class:`UserError` without importing the parser, and so that ``python -m
rayft.cluster.cli`` and the ``rayft`` script share one class.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""A run that failed while running, or an internal error (its traceback is in a log file)."""
EXIT_BAD_INPUT = 2
"""Bad input: a config key, data file and line, model, artifact name or address."""
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2.

    The message names what is wrong (a file, a key, an address) and what to do.
    """


class ClusterError(Exception):
    """The Ray cluster could not do what was asked (not ready, refused a request).

    Not the user's input and not a bug in rayft: printed as one line, exit code 1.
    """


class TrainingFailed(ClusterError):
    """A run that failed while it ran (not because of its input); exit code 1.

    Its checkpoints stay in storage: ``rayft.train(resume=err.run_id)`` (``rayft train
    --resume RUN_ID``) continues from the newest one. The error that stopped the run is
    chained as ``__cause__``.

    Attributes:
        run_id: The run that failed.
    """

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return type(self), (self.run_id, str(self))


def bad_input_types() -> tuple[type[BaseException], ...]:
    """Exception types that always mean the user's input is wrong (exit code 2)."""
    from rayft.trainers.config import ConfigError
    from rayft.trainers.data import DataError
    from rayft.trainers.models import ModelError
    from rayft.trainers.registry import RegistryError

    return (ConfigError, UserError, DataError, ModelError, RegistryError)


def is_bad_input(err: BaseException) -> bool:
    """True when ``err`` is the user's to fix and its message says what to fix.

    A ``FileNotFoundError`` counts only when it names its file: one without a name (such
    as ``os.getcwd()`` in a directory that was removed) is rayft's problem, not the user's.
    """
    from rayft.trainers.config import ConfigError

    # Checked first: the other types' modules import torch, seconds for a spec error.
    if isinstance(err, (ConfigError, UserError)) or isinstance(err, bad_input_types()):
        return True
    return isinstance(err, FileNotFoundError) and bool(err.filename)


def root_cause(err: BaseException) -> str:
    """``Type: message`` of the innermost explicitly chained cause (``raise ... from``), or
    of the first error on the way that explains its cause (``explains_cause``: its message
    already says what went wrong and what to do, such as a full disk)."""
    while err.__cause__ is not None and not getattr(err, "explains_cause", False):
        err = err.__cause__
    return f"{type(err).__name__}: {err}"
