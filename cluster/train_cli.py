"""``rayft train`` and ``rayft validate``: run a job spec, or check it without running it.

rayft validate CONFIG [key=value ...] [--print] | --schema
rayft train CONFIG [key=value ...] [--address ADDR] [--run-id RUN_ID]
rayft train --resume RUN_ID [key=value ...] [--storage ROOT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from rayft.cluster.cli import add_address, add_overrides, add_storage, config_or_resume
from rayft.cluster.errors import EXIT_FAILED, TrainingFailed, UserError, root_cause


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``validate`` and ``train`` to the ``rayft`` parser."""
    p = sub.add_parser("validate", help="check a job spec and report every problem")
    p.add_argument("config", nargs="?", help="YAML job spec")
    add_overrides(p)
    p.add_argument("--print", action="store_true", help="print the resolved spec")
    p.add_argument(
        "--schema",
        action="store_true",
        help="list every key of the schema with its type, default and description",
    )
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
    from rayft.trainers.config import dump_yaml, load_spec

    if args.schema:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        print("\n".join(schema_lines(width)))
        return 0
    if not args.config:
        raise UserError("rayft validate needs CONFIG (or --schema to list every key)")
    spec = load_spec(args.config, args.overrides)
    if args.print:
        print(dump_yaml(spec), end="")
    else:
        print(f"{args.config}: valid ({spec.objective} with {spec.method} on {spec.model.name})")
    return 0


TYPE_COLUMN, DEFAULT_COLUMN, MIN_DESCRIPTION = 30, 12, 30
"""Column widths: a longer type or default pushes its own line's description on. A
terminal narrower than the first columns plus ``MIN_DESCRIPTION`` gets whole lines."""


def schema_lines(width: int | None = None) -> list[str]:
    """The job-spec keys, one aligned line each: key, type, default, description.

    Args:
        width: A terminal's width: descriptions that do not fit wrap onto indented
            continuation lines. ``None`` (a pipe or a file) keeps one line per key.
    """
    import textwrap

    from rayft.trainers.config import schema_fields

    rows = schema_fields()
    key_w = max(len(r.key) for r in rows)
    type_w = min(max(len(r.type) for r in rows), TYPE_COLUMN)
    default_w = min(max(len(r.default or "required") for r in rows), DEFAULT_COLUMN)
    indent = key_w + type_w + default_w + 6
    room = width - indent if width is not None else 0
    lines = []
    for row in rows:
        default = row.default if row.default is not None else "required"
        head = f"{row.key:<{key_w}}  {row.type:<{type_w}}  {default:<{default_w}}  "
        text = row.description.replace("``", "`")
        if room < MIN_DESCRIPTION:
            lines.append(head + text)
        else:
            lines += textwrap.wrap(
                text, width, initial_indent=head, subsequent_indent=" " * indent
            ) or [head]
    return lines


def cmd_train(args: argparse.Namespace) -> int:
    """Train through ``api.train``; print the eval summary and a JSON result line.

    ``api.train`` makes every check before Ray starts (spec, data, ``model.adapter``) and
    raises the typed errors ``cli.report_error`` turns into exit codes; a run that fails
    while running prints how to resume it and exits with 1.
    """
    from rayft.cluster.api import train
    from rayft.cluster.cli import write_error_log

    config, overrides = config_or_resume(
        args, "RUN_ID", "rayft train needs CONFIG (a YAML job spec) or --resume RUN_ID"
    )
    try:
        result = train(
            config,
            overrides=overrides,
            address=args.address,
            run_id=args.run_id,
            resume=args.resume,
            storage=args.storage if args.resume else None,
        )
    except TrainingFailed as failed:
        err = failed.__cause__ or failed
        try:
            log = f" (traceback in {write_error_log(err)})"
        except OSError:
            log = ""
        print(
            f"rayft: training failed: {root_cause(err)}{log}\n"
            f"resume from the last checkpoint with: rayft train --resume {failed.run_id}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print_eval_summary(result.evals)
    artifact = result.artifact.path if result.artifact is not None else None
    print(
        json.dumps(
            {"run_id": result.run_id, "artifact": str(artifact), "metrics": result.metrics},
            default=str,
        )
    )
    return 0


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
