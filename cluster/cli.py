"""The ``rayft`` command line: the parser, the options commands share, and error handling.

Each command group lives in its own module with a ``register(subparsers)`` function:
``train_cli`` (train, validate), ``models_cli`` (models), ``tune_cli`` (tune),
``serve_cli`` (serve, eval), ``jobs_cli`` (submit, jobs, cluster) and ``keys_cli`` (keys).

Exit codes: 0 success; 1 a run that failed while running, or an internal error (its
traceback goes to a log file whose path is printed); 2 bad input (config key, data file
and line, model or artifact name, address) with a message naming what to fix.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from rayft.cluster.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    ClusterError,
    UserError,
    is_bad_input,
)
from rayft.cluster.errors import root_cause as _root_cause

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "UserError",
    "build_parser",
    "is_bad_input",
    "main",
    "parse_args",
]

COMMAND_MODULES = (
    "rayft.cluster.train_cli",
    "rayft.cluster.models_cli",
    "rayft.cluster.tune_cli",
    "rayft.cluster.serve_cli",
    "rayft.cluster.jobs_cli",
    "rayft.cluster.keys_cli",
)

LOG_DIR_ENV = "RAYFT_LOG_DIR"

# ----------------------------------------------------------------- shared options

_ADDRESS_HELP = {
    "ray": "Ray cluster address (default: $RAY_ADDRESS, else an embedded local cluster)",
    "jobs": "address of the Ray Jobs API, http://HEAD:8265 (default: $RAY_ADDRESS)",
    "any": "http://HEAD:8265, a Ray address, or none for an embedded local cluster "
    "(default: $RAY_ADDRESS)",
}


def add_address(parser: argparse.ArgumentParser, target: str = "ray") -> None:
    """``--address``: a Ray address (``ray``), a Jobs API URL (``jobs``), or either (``any``).

    The Jobs API targets also get ``--token-file``: every request to them carries the
    cluster's token.
    """
    parser.add_argument("--address", default=None, help=_ADDRESS_HELP[target])
    if target in ("jobs", "any"):
        parser.add_argument(
            "--token-file",
            default=None,
            metavar="PATH",
            help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, "
            "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
        )


def add_storage(parser: argparse.ArgumentParser, help: str) -> None:
    """``--storage``: the artifact root (a directory or an ``s3://`` / ``gs://`` URI)."""
    parser.add_argument("--storage", default=None, metavar="ROOT", help=help)


def add_overrides(parser: argparse.ArgumentParser, example: str = "optim.lr=5e-4") -> None:
    """The ``key=value`` positionals; :func:`parse_args` also collects them after options."""
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help=f"override a key, e.g. {example}"
    )


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: Ray's worker logs and library warnings on the console too."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also show Ray's worker logs and library warnings (or set RAYFT_LOG_LEVEL=info)",
    )


def config_or_resume(
    args: argparse.Namespace, resume_id: str, needs: str
) -> tuple[str | None, list[str]]:
    """``(CONFIG, overrides)`` of a command that takes CONFIG or ``--resume ID``.

    With ``--resume`` a ``key=value`` in CONFIG's place is one more override; CONFIG and
    ``--resume`` together, or neither, is a :class:`UserError` (``needs`` says what to give).
    """
    if args.resume:
        if args.config and "=" not in args.config:
            raise UserError(f"give either CONFIG or --resume {resume_id}, not both")
        return None, ([args.config] if args.config else []) + args.overrides
    if not args.config:
        raise UserError(needs)
    return args.config, args.overrides


# ----------------------------------------------------------------- errors


def log_dir() -> Path:
    """Where internal errors leave their tracebacks: ``$RAYFT_LOG_DIR`` or ``<tmp>/rayft-logs``.

    An absolute path outside the working directory, which may be gone by the time an
    error is reported.
    """
    return Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "rayft-logs")


def write_error_log(err: BaseException, argv: list[str] | None = None) -> Path:
    """Write the command line and ``err``'s full traceback to a new file; returns its path."""
    directory = log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rayft-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    command = " ".join(["rayft", *(sys.argv[1:] if argv is None else argv)])
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path.write_text(f"{command}\n\n{text}")
    return path


def report_error(err: BaseException, argv: list[str] | None = None) -> int:
    """Print one line for ``err`` and return the exit code.

    Bad input prints its message (exit 2); so does a :class:`ClusterError` (the cluster
    could not do it, exit 1). Anything else is an internal error: the traceback goes to
    a log file and the line says where (exit 1).
    """
    if is_bad_input(err):
        print(f"rayft: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if isinstance(err, ClusterError):
        print(f"rayft: {err}", file=sys.stderr)
        return EXIT_FAILED
    try:
        where = f"the traceback is in {write_error_log(err, argv)}"
    except OSError as log_err:  # the log must not hide the error it reports
        where = f"no log written ({log_err}); rerun with --verbose"
    print(f"rayft: internal error: {_root_cause(err)} ({where})", file=sys.stderr)
    return EXIT_FAILED


# ----------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The ``rayft`` parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog="rayft",
        description="Fine-tune LLMs with LoRA / DeepSpeed ZeRO on Ray, sweep, serve and evaluate.",
    )
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in _leaf_parsers(parser):
        add_verbose(command)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (nested groups such as ``jobs list`` included)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases repeat a parser
                found += _leaf_parsers(child) or [child]
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key=value`` overrides may also follow the options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = isinstance(getattr(args, "overrides", None), list)
        stray = [t for t in extra if not takes_overrides or t.startswith("-") or "=" not in t]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*args.overrides, *extra]
    args.verbose = getattr(args, "verbose", False)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one ``rayft`` command; returns its exit code."""
    from rayft.cluster.console import configure
    from rayft.cluster.job_start import leave_working_dir, remove_private_copy

    args = parse_args(argv)
    try:
        configure(verbose=args.verbose)
        if argv is None:  # a process of its own: a submitted job re-executes elsewhere first
            leave_working_dir(sys.argv[1:])
        return args.func(args)
    except KeyboardInterrupt:
        print("rayft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``rayft validate --schema | head``): stop writing quietly,
        # and keep the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as err:
        return report_error(err, argv)
    finally:
        if argv is None:
            remove_private_copy()


if __name__ == "__main__":
    # Through the installed module, so that ``python -m rayft.cluster.cli`` (how submitted
    # jobs run) and the ``rayft`` script raise and catch the very same classes.
    from rayft.cluster.cli import main as _main

    sys.exit(_main())
