"""``rayft tune``: hyperparameter sweeps (Ray Tune over rayft training runs)."""

from __future__ import annotations

import argparse
import json
import sys

from rayft.cluster.cli import add_address, add_overrides, add_storage, config_or_resume
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
    """Run or resume a sweep through ``api.tune`` (which validates it before Ray starts)."""
    from rayft.cluster.api import tune
    from rayft.raytune.sweep import SweepInterrupted

    if args.resume and args.sweep_id:
        raise UserError("give either --resume SWEEP_ID or --id SWEEP_ID, not both")
    config, overrides = config_or_resume(
        args,
        "SWEEP_ID",
        "rayft tune needs CONFIG (a job spec with a tune: section) or --resume SWEEP_ID",
    )
    try:
        result = tune(
            config,
            overrides=overrides,
            address=args.address,
            sweep_id=args.sweep_id,
            resume=args.resume,
            storage=args.storage,
            show_progress=not args.quiet,
        )
    except SweepInterrupted as err:
        print(f"rayft: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    artifact = result.best_artifact
    summary = {
        "sweep_id": result.sweep_id,
        "path": str(result.path),
        "best": result.best,
        "artifact": str(artifact.path) if artifact is not None else None,
        "table": str(result.table_csv),
        "plot": str(result.plot),
        "trials": {
            state: len(result.by_state(state)) for state in ("finished", "early_stopped", "error")
        },
    }
    print(json.dumps(summary, default=str))
    return 0 if artifact is not None else EXIT_FAILED
