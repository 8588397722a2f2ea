"""The ``rayft`` command line.

Exit codes: 0 success, 1 a run that failed while running, 2 bad input (config, data,
model name, artifact name) with a message naming what to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from rayft.trainers.config import ConfigError

    types: list[type[BaseException]] = [ConfigError, UserError, FileNotFoundError]
    try:
        from rayft.trainers.data import DataError

        types.append(DataError)
    except ImportError:  # pragma: no cover - data module always ships
        pass
    from rayft.trainers.models import ModelError
    from rayft.trainers.registry import RegistryError

    types += [ModelError, RegistryError]
    return tuple(types)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local cluster)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
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


def cmd_train(args: argparse.Namespace) -> int:
    from rayft.cluster.connect import connected
    from rayft.trainers.config import apply_overrides, load_spec, validate_spec
    from rayft.trainers.driver import load_run_spec, run_training

    if args.resume:
        if args.config and "=" not in args.config:
            raise UserError("give either CONFIG or --resume RUN_ID, not both")
        overrides = ([args.config] if args.config else []) + args.overrides
        spec = load_run_spec(args.resume, args.storage)
        spec = validate_spec(apply_overrides(spec.to_dict(), overrides))
    else:
        if not args.config:
            raise UserError("rayft train needs CONFIG (a YAML job spec) or --resume RUN_ID")
        spec = load_spec(args.config, args.overrides)
    check_data(spec)
    with connected(args.address):
        try:
            run_id = args.resume or args.run_id
            outcome = run_training(spec, run_id=run_id, resume=bool(args.resume))
        except Exception as err:
            if isinstance(err, _bad_input_types()):
                raise
            run_hint = args.resume or "<run id printed above>"
            print(
                f"rayft: training failed: {_root_cause(err)}\n"
                f"resume from the last checkpoint with: rayft train --resume {run_hint}",
                file=sys.stderr,
            )
            return 1
    _print_eval_summary(outcome.evals())
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


def check_data(spec) -> None:
    """Scan every data file before any cluster work, so bad rows fail in seconds."""
    from rayft.trainers.data import scan_source

    for key in ("train", "eval"):
        paths = getattr(spec.data, key)
        for path in [paths] if isinstance(paths, str) else paths or []:
            scan_source(path, spec.data.format)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def _print_eval_summary(evals: list[dict]) -> None:
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


def cmd_models(args: argparse.Namespace) -> int:
    from rayft.trainers.models import list_models, pull_builtin

    if args.models_cmd == "list":
        rows = list_models()
        width = max(len(r["name"]) for r in rows)
        for row in rows:
            print(f"{row['name']:<{width}}  {row['kind']:<9}  {row['state']:<10}  {row['about']}")
        return 0
    if args.models_cmd == "pull":
        print(pull_builtin(args.name))
        return 0
    if args.models_cmd == "export":
        from rayft.trainers.export import export_merged

        out = export_merged(args.name, args.merge)
        print(f"merged model written to {out}")
        return 0
    raise UserError("rayft models needs one of: list, pull NAME, export NAME --merge OUT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayft",
        description="Fine-tune LLMs with LoRA / DeepSpeed ZeRO on Ray, sweep, serve and evaluate.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a job spec and report every problem")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--print", action="store_true", help="print the resolved spec")
    p.add_argument("--schema", action="store_true", help="list every key of the schema")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="fine-tune on Ray Train with DeepSpeed")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a run from its newest checkpoint")
    p.add_argument("--storage", default=None, help="artifact root of the run to resume")
    # `rayft submit` names the run before it starts, so `rayft jobs` can find it in storage.
    p.add_argument("--run-id", default=None, help="name for a new run (default: generated)")
    _add_address(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="builtin and published models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="builtin and cached models")
    pp = msub.add_parser("pull", help="fetch/convert a builtin model into the cache")
    pp.add_argument("name")
    pe = msub.add_parser("export", help="merge an adapter into its base model")
    pe.add_argument("name", help="published adapter name")
    pe.add_argument("--merge", required=True, metavar="OUT", help="output HF model directory")
    p.set_defaults(func=cmd_models)

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Sub-commands that live in their own modules (serving, sweeps, cluster jobs)."""
    import importlib
    import importlib.util

    names = ("rayft.cluster.serve_cli", "rayft.cluster.tune_cli", "rayft.cluster.jobs_cli")
    return [
        importlib.import_module(name).register
        for name in names
        if importlib.util.find_spec(name) is not None
    ]


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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("rayft: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, _bad_input_types()):
            print(f"rayft: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
