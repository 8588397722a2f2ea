"""What the console shows: rayft's own lines by default, everything with ``--verbose``.

By default a command prints rayft's lines and one progress bar. Ray's worker and actor
output (``(RayTrainWorker pid=...)`` lines, ``PlacementGroupCleaner`` warnings, Ray
Train's ``TrainingReport(...)`` lines), the driver-side INFO logs of Ray Train, Tune and
Data, library ``FutureWarning``s and DeepSpeed's accelerator notice stay off the console;
Ray still writes all of it to its log files (``/tmp/ray/session_*/logs``).
``--verbose`` or ``RAYFT_LOG_LEVEL=info|debug`` brings it back.
"""

from __future__ import annotations

import logging
import os
import warnings

from rayft.cluster.errors import UserError

LEVEL_ENV = "RAYFT_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "warning"

# Driver-side loggers of the Ray libraries rayft drives; their INFO lines ("execution
# finished", "Progress bars disabled", ...) repeat what rayft prints in its own words.
RAY_LIBRARY_LOGGERS = {"ray.train": logging.WARNING, "ray.tune": logging.WARNING}
RAY_DATA_LOGGER = "ray.data"
DEEPSPEED_LOGGER = "DeepSpeed"


def log_level() -> str:
    """The console level: ``$RAYFT_LOG_LEVEL`` (``debug|info|warning|error``), else ``warning``.

    Raises:
        UserError: the variable holds anything else.
    """
    value = os.environ.get(LEVEL_ENV, "").strip().lower() or DEFAULT_LEVEL
    if value not in LEVELS:
        raise UserError(f"{LEVEL_ENV}={value!r}: use one of {', '.join(LEVELS)}")
    return value


def is_verbose() -> bool:
    """True when Ray's and the libraries' own output should reach the console."""
    return log_level() in ("debug", "info")


class _BelowError(logging.Filter):
    """Drops records below ERROR; survives libraries that reset their logger's level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_DEEPSPEED_FILTER = _BelowError()


def configure(verbose: bool = False) -> None:
    """Set up this process's console for one command.

    Args:
        verbose: ``--verbose``: show Ray's worker logs and library warnings (the same as
            ``RAYFT_LOG_LEVEL=info``). The level is kept in the environment, so
            :func:`rayft.cluster.connect.connect` and submitted jobs see it too.
    """
    if verbose and not is_verbose():
        os.environ[LEVEL_ENV] = "info"
    deepspeed_logger = logging.getLogger(DEEPSPEED_LOGGER)
    if is_verbose():
        deepspeed_logger.removeFilter(_DEEPSPEED_FILTER)
        return
    # Library deprecation notices are for the library's callers (rayft), not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # DeepSpeed re-creates its logger (level INFO, its own stdout handler) on import, so a
    # level set now would not last; a filter on the logger does. Its CPU notice would
    # otherwise land on stdout, where the commands print their machine-readable result.
    deepspeed_logger.addFilter(_DEEPSPEED_FILTER)
    # Transformers' and the Hub's own bars ("Writing model shards", "Loading weights").
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def quiet_ray_libraries() -> None:
    """Lower the driver-side loggers of Ray Train, Tune and Data, unless verbose.

    Called once Ray is initialised: Ray Data configures its loggers when it is first
    imported, so a level set before that would be overwritten.
    """
    if is_verbose():
        return
    import ray.data  # noqa: F401 - configures its loggers on import; set levels after that

    for name, level in RAY_LIBRARY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger(RAY_DATA_LOGGER).setLevel(logging.ERROR)
