"""``rayft train`` and ``rayft validate``: run a job spec, or check it without running it.

rayft validate CONFIG [key=value ...] [--print] | --schema
rayft train CONFIG [key=value ...] [--address ADDR] [--run-id RUN_ID]
rayft train --resume RUN_ID [key=value ...] [--storage ROOT]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from rayft.cluster.cli import add_address, add_overrides, add_storage
from rayft.cluster.errors import EXIT_FAILED, UserError

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``validate`` and ``train`` to the ``rayft`` parser."""
    p = sub.add_parser("validate", help="check a job spec and report every problem")
    p.add_argument("config", nargs="?", help="YAML job spec")
    add_overrides(p)
    p.add_argument("--print", action="store_true", help="print the resolved spec")
    p.add_argument("--schema", action="store_true", help="list every key of the schema")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="fine-tune on Ray Train with DeepSpeed")
    p.add_argument("config", nargs="?", help="YAML job spec")
    add_overrides(p)
    p.add_argument("--resume", metavar="RUN_ID", help="continue a run from its newest checkpoint")
    add_storage(p, "artifact root of the run to resume")
    # `rayft submit` names the run before it starts, so `rayft jobs` can find it in storage.
    p.add_argument("--run-id", default=None, help="name for a new run (default: generated)")
    add_address(p)
    p.set_defaults(func=cmd_train)


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the schema, the resolved spec, or one line saying the spec is valid."""
    from rayft.trainers.config import dump_yaml, load_spec, schema_keys

    if args.schema:
        print("\n".join(schema_keys()))
        return 0
    if not args.config:
        raise UserError("rayft validate needs CONFIG (or --schema to list every key)")
    spec = load_spec(args.config, args.overrides)
    if args.print:
        print(dump_yaml(spec), end="")
    else:
        print(f"{args.config}: valid ({spec.method} on {spec.model.name})")
    return 0


def train_spec(args: argparse.Namespace) -> JobSpec:
    """The spec to train: ``CONFIG`` plus overrides, or the resumed run's spec plus overrides."""
    from rayft.trainers.config import apply_overrides, load_spec, validate_spec
    from rayft.trainers.driver import load_run_spec

    if args.resume:
        if args.config and "=" not in args.config:
            raise UserError("give either CONFIG or --resume RUN_ID, not both")
        overrides = ([args.config] if args.config else []) + args.overrides
        spec = load_run_spec(args.resume, args.storage)
        return validate_spec(apply_overrides(spec.to_dict(), overrides))
    if not args.config:
        raise UserError("rayft train needs CONFIG (a YAML job spec) or --resume RUN_ID")
    return load_spec(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Validate, scan the data, train on Ray, print the eval summary and a JSON result line."""
    from rayft.cluster.connect import connected
    from rayft.trainers.driver import run_training
    from rayft.trainers.lineage import resolve_parent

    spec = train_spec(args)
    scanned = check_data(spec)
    resolve_parent(spec)  # model.adapter: refused here, before Ray starts
    with connected(args.address):
        try:
            run_id = args.resume or args.run_id
            outcome = run_training(spec, run_id=run_id, resume=bool(args.resume), scanned=scanned)
        except Exception as err:
            from rayft.cluster.cli import _root_cause, is_bad_input, write_error_log

            if is_bad_input(err):
                raise
            try:
                log = f" (traceback in {write_error_log(err)})"
            except OSError:
                log = ""
            run_hint = args.resume or "<run id printed above>"
            print(
                f"rayft: training failed: {_root_cause(err)}{log}\n"
                f"resume from the last checkpoint with: rayft train --resume {run_hint}",
                file=sys.stderr,
            )
            return EXIT_FAILED
    print_eval_summary(outcome.evals())
    print(
        json.dumps(
            {
                "run_id": outcome.run_id,
                "artifact": str(outcome.artifact),
                "metrics": outcome.metrics,
            },
            default=str,
        )
    )
    return 0


def check_data(spec: JobSpec) -> Any:
    """Scan every data file before any cluster work, so bad rows fail in seconds.

    Returns:
        The ``trainers.data.SourceScan``, handed to the run so no file is scanned twice.
    """
    from rayft.trainers.data import scan_sources

    return scan_sources(spec)


def print_eval_summary(evals: list[dict]) -> None:
    """The first and last evaluation side by side (stderr)."""
    if not evals:
        return
    first, last = evals[0], evals[-1]
    print("eval            before      after", file=sys.stderr)
    for key in ("eval_loss", "eval_perplexity"):
        if key in first and key in last:
            print(
                f"{key:<14}{first[key]:>8.4f} {last[key]:>10.4f}   (steps {first['step']} -> {last['step']})",
                file=sys.stderr,
            )
