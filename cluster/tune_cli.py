"""``rayft tune``: hyperparameter sweeps (Ray Tune over rayft training runs)."""

from __future__ import annotations

import argparse
import json
import sys

from rayft.cluster.cli import add_address, add_overrides, add_storage
from rayft.cluster.errors import EXIT_FAILED, EXIT_INTERRUPTED, UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` sub-command to the ``rayft`` parser."""
    p = subparsers.add_parser(
        "tune",
        help="run a hyperparameter sweep (Ray Tune, ASHA early stopping) over a job spec",
        description="Run a Ray Tune sweep: every trial is a rayft training run of CONFIG "
        "with the values of its tune.search_space set.",
    )
    p.add_argument("config", nargs="?", help="job spec with a tune: section")
    add_overrides(p, "tune.num_samples=4")
    p.add_argument(
        "--resume",
        metavar="SWEEP_ID",
        help="continue an interrupted sweep (finished trials are kept)",
    )
    p.add_argument(
        "--id",
        dest="sweep_id",
        metavar="SWEEP_ID",
        help="name of a new sweep under sweeps/ (default: generated)",
    )
    add_storage(p, "artifact root of the sweep to resume")
    p.add_argument("--quiet", action="store_true", help="no live trial table")
    add_address(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    """Validate the sweep before connecting to Ray, then run or resume it."""
    from rayft.cluster.connect import connected
    from rayft.raytune.sweep import SweepInterrupted, load_sweep_spec, run_sweep, validate_sweep
    from rayft.trainers.config import apply_overrides, load_spec, validate_spec

    if args.resume:
        if args.sweep_id:
            raise UserError("give either --resume SWEEP_ID or --id SWEEP_ID, not both")
        if args.config and "=" not in args.config:
            raise UserError("give either CONFIG or --resume SWEEP_ID, not both")
        overrides = ([args.config] if args.config else []) + args.overrides
        spec = load_sweep_spec(args.resume, args.storage)
        if overrides:
            spec = validate_spec(apply_overrides(spec.to_dict(), overrides))
        sweep_id = args.resume
    else:
        if not args.config:
            raise UserError(
                "rayft tune needs CONFIG (a job spec with a tune: section) or --resume SWEEP_ID"
            )
        spec = load_spec(args.config, args.overrides)
        sweep_id = args.sweep_id
    validate_sweep(spec)
    with connected(args.address):
        try:
            outcome = run_sweep(
                spec, sweep_id=sweep_id, resume=bool(args.resume), show_progress=not args.quiet
            )
        except SweepInterrupted as err:
            print(f"rayft: {err}", file=sys.stderr)
            return EXIT_INTERRUPTED
    summary = {
        "sweep_id": outcome.sweep_id,
        "path": str(outcome.path),
        "best": outcome.best,
        "artifact": str(outcome.artifact) if outcome.artifact else None,
        "table": str(outcome.table_csv),
        "plot": str(outcome.plot),
        "trials": {
            state: len(outcome.by_state(state)) for state in ("finished", "early_stopped", "error")
        },
    }
    print(json.dumps(summary, default=str))
    return 0 if outcome.artifact is not None else EXIT_FAILED
