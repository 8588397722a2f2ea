"""``rayft models {list,pull,export,lineage}``: builtin, cached and published models."""

from __future__ import annotations

import argparse

from rayft.cluster.cli import add_storage
from rayft.cluster.errors import UserError
from rayft.trainers.storage import StorageRoot


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` and its sub-commands to the ``rayft`` parser."""
    p = sub.add_parser("models", help="builtin and published models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="builtin and cached models")
    pp = msub.add_parser("pull", help="fetch/convert a builtin model into the cache")
    pp.add_argument("name")
    pe = msub.add_parser("export", help="merge an adapter into its base model")
    pe.add_argument("name", help="published adapter name")
    pe.add_argument("--merge", required=True, metavar="OUT", help="output HF model directory")
    pl = msub.add_parser(
        "lineage", help="the chain of adapters/models an artifact was trained from"
    )
    pl.add_argument("name", help="published adapter or model name")
    pl.add_argument("--json", action="store_true", help="print the chain as JSON")
    add_storage(pl, "artifact root (default $RAYFT_HOME)")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    """List the models, pull a builtin one into the cache, or merge an adapter into its base."""
    from rayft.trainers.models import list_models, pull_builtin

    # Only ``lineage`` takes --storage; the others use the default root's model cache.
    root = StorageRoot.resolve(getattr(args, "storage", None))
    if args.models_cmd == "list":
        rows = list_models(root.models)
        width = max(len(r["name"]) for r in rows)
        for row in rows:
            print(f"{row['name']:<{width}}  {row['kind']:<9}  {row['state']:<10}  {row['about']}")
        return 0
    if args.models_cmd == "pull":
        print(pull_builtin(args.name, root.models))
        return 0
    if args.models_cmd == "lineage":
        return cmd_lineage(args, root)
    if args.models_cmd == "export":
        from rayft.trainers.export import export_merged

        out = export_merged(args.name, args.merge, root)
        print(f"merged model written to {out}")
        return 0
    raise UserError(
        "rayft models needs one of: list, pull NAME, export NAME --merge OUT, lineage NAME"
    )


def cmd_lineage(args: argparse.Namespace, root: StorageRoot) -> int:
    """Print the chain from a published artifact back to its base model, one line each."""
    import json

    from rayft.trainers.lineage import format_lineage, lineage

    chain = lineage(args.name, root)
    if args.json:
        print(json.dumps(chain, indent=2, default=str))
    else:
        print("\n".join(format_lineage(chain)))
    return 0
