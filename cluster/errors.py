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
