"""``rayft serve`` and ``rayft eval``: the serving application and evaluation from the shell.

    rayft serve [--config SERVE.yaml] [key=value ...] [--address ADDR] [--host H] [--port P]
                [--allowed-host NAME ...] [--grace-period S]
                [--metrics-port P] [--dashboard [--dashboard-port P]]
    rayft eval --model NAME --data FILE [--metrics loss bleu ...] [--url URL | --in-process]
    rayft eval --model NAME --benchmarks TASK ... [--tasks-dir DIR] [--limit N] [--url URL]

``SERVE.yaml`` is either a mapping of ``serving.app.ServeArgs`` fields or a Ray Serve
config file (``applications: [{import_path: rayft.cluster.service_app:build_service_app,
args: {...}}]``; ``rayft.serving.app:build_app`` is read the same way); ``key=value``
arguments override it. ``rayft serve`` always runs the whole service
(``cluster.service_app``): inference and the fine-tuning jobs API.

``rayft serve`` prints the API's URL first, then where monitoring goes: one
``metrics: http://<node>:<port>/metrics`` line per Ray node (the Prometheus scrape URL
of Ray's metrics agent, which carries rayft's per-model metrics, see
``serving.metrics``), ``request log: <dir>`` with ``request_log=true``, and
``dashboard: <url>`` with ``--dashboard``.

SIGTERM or Ctrl-C stops it gracefully: new requests are answered 503 with
``Retry-After``, requests in flight get ``--grace-period`` seconds to finish, then Serve
and the Ray cluster it started shut down, and the command exits 0 with one line. A
second signal stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayft.cluster.cli import add_address, add_overrides, add_storage
from rayft.cluster.errors import UserError

if TYPE_CHECKING:
    from rayft.trainers.storage import StorageRoot

IMPORT_PATH = "rayft.cluster.service_app:build_service_app"
IMPORT_PATHS = (IMPORT_PATH, "rayft.serving.app:build_app")
"""Serve config applications whose ``args`` ``rayft serve`` reads."""
DASHBOARD_PORT = 8265


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``eval`` sub-commands to the ``rayft`` parser."""
    p = subparsers.add_parser("serve", help="serve the base model and its adapters over HTTP")
    p.add_argument("--config", default=None, help="serve arguments or a Serve config YAML")
    add_overrides(p, "model=tiny-llama")
    add_address(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP interface (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="a Host name the API answers to besides loopback and --host (repeatable; "
        "'*' for any, behind a proxy that checks it)",
    )
    p.add_argument(
        "--grace-period",
        type=float,
        default=None,
        metavar="S",
        help="on SIGTERM/Ctrl-C, seconds requests in flight may take to finish (default 30)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve on a non-loopback --host without RAYFT_API_KEY (anyone reaching it may use it)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus port of the embedded cluster on 127.0.0.1 (default: a free port)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start the Ray dashboard of the embedded cluster on 127.0.0.1",
    )
    p.add_argument(
        "--dashboard-port", type=int, default=DASHBOARD_PORT, help="dashboard port (default 8265)"
    )
    p.set_defaults(func=cmd_serve)

    e = subparsers.add_parser(
        "eval", help="loss, perplexity and generation metrics of a model, or lm-eval benchmarks"
    )
    e.add_argument("--model", required=True, help="base model or published adapter name")
    e.add_argument("--data", default=None, help=".jsonl or .json file of rows")
    e.add_argument(
        "--benchmarks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="lm-evaluation-harness tasks instead of --data: rayft_capitals rayft_arithmetic, "
        "or tasks of --tasks-dir",
    )
    e.add_argument("--tasks-dir", default=None, help="a folder of more lm-eval task YAML files")
    e.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    e.add_argument(
        "--tokenizer",
        default=None,
        help="the served base model's tokenizer directory for --benchmarks with --url "
        "(default: the base model in the rayft root)",
    )
    e.add_argument(
        "--samples", default=None, help="write lm-eval's per-document records to this folder"
    )
    e.add_argument(
        "--metrics",
        nargs="+",
        default=["loss", "perplexity"],
        help="loss perplexity exact_match token_f1 rouge_1 rouge_2 rouge_l bleu",
    )
    e.add_argument("--format", default="auto", help="row format (default: detect per row)")
    e.add_argument("--max-tokens", type=int, default=128, help="generation budget per row")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="a running rayft endpoint")
    where.add_argument(
        "--in-process", action="store_true", help="load the model here (the default without --url)"
    )
    add_storage(e, "rayft root (default $RAYFT_HOME)")
    e.add_argument("--dtype", default="auto", help="model dtype for --in-process")
    e.set_defaults(func=cmd_eval)


def serve_args_from(config: str | None, overrides: list[str]) -> dict[str, Any]:
    """The ``ServeArgs`` dict from an optional YAML file and ``key=value`` overrides."""
    from rayft.trainers.config import ConfigError, apply_overrides, read_yaml

    data: dict[str, Any] = read_yaml(config) if config else {}
    if "applications" in data:
        apps = data["applications"] or []
        ours = [a for a in apps if isinstance(a, dict) and a.get("import_path") in IMPORT_PATHS]
        if not ours:
            raise ConfigError([("applications", f"no application with import_path {IMPORT_PATH}")])
        data = dict(ours[0].get("args") or {})
    return apply_overrides(data, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted: the checks, Ray and the application come from ``api.serve``."""
    from rayft.cluster.api import serve, stop_serving
    from rayft.serving.app import parse_args

    overrides = serve_args_from(args.config, args.overrides)
    if args.allowed_host:
        overrides["allowed_hosts"] = [*overrides.get("allowed_hosts", []), *args.allowed_host]
    if args.grace_period is not None:
        overrides["grace_period_s"] = args.grace_period
    cfg = parse_args(overrides)
    url = serve(
        cfg,
        address=args.address,
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        metrics_port=args.metrics_port,
        dashboard_port=args.dashboard_port if args.dashboard else None,
    )
    # Installed after Ray's own SIGTERM handler (ray.init sets one that exits at once).
    stop = _stop_on_signals()
    drained = False
    try:
        print(url, flush=True)
        print_monitoring(cfg, args.dashboard_port if args.dashboard else None)
        print(
            f"[rayft] OpenAI-compatible API at {url}/v1 (models: {url}/v1/models); Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        while not stop.is_set():
            time.sleep(0.5)
        started = time.monotonic()
        stop_serving(drain=True)
        drained = True
        print(
            f"[rayft] stopped: drained in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    finally:
        if not drained:
            stop_serving()
    return 0


def _stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set; a second signal stops at once (the default action)."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)
    return stop


def print_monitoring(cfg: Any, dashboard_port: int | None = None) -> None:
    """Print where the metrics, the request log and the dashboard of the served app are."""
    from rayft.serving.metrics import metrics_urls
    from rayft.serving.request_log import LOG_DIR
    from rayft.trainers.storage import StorageRoot

    urls = metrics_urls()
    for url in urls:
        print(f"metrics: {url}", flush=True)
    if not urls:
        print(
            "metrics: none (no Ray metrics agent runs; install ray[default] to export them)",
            flush=True,
        )
    if cfg.request_log:
        where = StorageRoot.resolve(cfg.storage).url(LOG_DIR)
        payloads = "with prompts and outputs" if cfg.log_payloads else "without payloads"
        print(f"request log: {where} ({payloads}; <day>/<replica>.jsonl)", flush=True)
    if dashboard_port is not None:
        print(f"dashboard: http://127.0.0.1:{dashboard_port}", flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from rayft.serving.errors import ServingError
    from rayft.serving.evaluation import check_metrics, read_rows
    from rayft.trainers.storage import StorageRoot

    root = StorageRoot.resolve(args.storage)
    if args.benchmarks is not None:
        return _benchmarks(args, root)
    if args.data is None:
        raise UserError(
            "give --data FILE (loss, perplexity, generation metrics) or --benchmarks TASK ..."
        )
    path = Path(args.data)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    try:
        check_metrics(args.metrics)
        rows = read_rows(path)
        if args.url:
            result = _eval_remote(args, rows)
        else:
            result = _eval_in_process(args, rows, root)
    except ServingError as err:
        raise UserError(err.message) from None
    print(json.dumps(result, indent=2))
    return 0


def _benchmarks(args: argparse.Namespace, root: StorageRoot) -> int:
    """``--benchmarks``: lm-eval tasks, a JSON object of scores per task on stdout."""
    from rayft.cluster.benchmarking import benchmark

    if args.data is not None:
        raise UserError("--data and --benchmarks: give one of them")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give at least 1 document per task")
    scores = benchmark(
        args.model,
        args.benchmarks,
        url=args.url,
        root=root,
        tokenizer=args.tokenizer,
        tasks_dir=args.tasks_dir,
        limit=args.limit,
        dtype=args.dtype,
        samples_out=Path(args.samples) if args.samples else None,
    )
    result = {"model": args.model, "benchmarks": {t: s.model_dump() for t, s in scores.items()}}
    print(json.dumps(result, indent=2))
    return 0


def _eval_remote(args: argparse.Namespace, rows: list[Any]) -> dict[str, Any]:
    import httpx

    key = os.environ.get("RAYFT_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "model": args.model,
        "rows": rows,
        "metrics": args.metrics,
        "format": args.format,
        "max_tokens": args.max_tokens,
    }
    try:
        response = httpx.post(
            f"{args.url.rstrip('/')}/v1/evaluations", json=body, headers=headers, timeout=3600
        )
    except httpx.HTTPError as err:
        raise UserError(f"cannot reach {args.url}: {err}") from None
    if response.status_code >= 500:
        raise RuntimeError(f"{args.url} failed: HTTP {response.status_code}: {response.text}")
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise UserError(
            f"{args.url} refused the evaluation (HTTP {response.status_code}): {message}"
        )
    return response.json()


def _eval_in_process(
    args: argparse.Namespace, rows: list[Any], root: StorageRoot
) -> dict[str, Any]:
    import asyncio

    from rayft.serving.engine import ModelEngine
    from rayft.serving.service import ModelService
    from rayft.trainers.registry import ArtifactManifest, RegistryError, sync_adapter

    base = args.model
    try:
        manifest_dir = sync_adapter(args.model, root)
    except RegistryError:  # not an adapter name (a hub id or a path): the model is the base
        manifest_dir = None
    if manifest_dir is not None and (manifest_dir / "adapter_config.json").is_file():
        manifest = ArtifactManifest.find(manifest_dir)
        base = (manifest.base_model if manifest is not None else None) or base
    engine = ModelEngine(base, storage=root, max_loaded_adapters=1, dtype=args.dtype)
    service = ModelService(engine)

    async def run() -> dict[str, Any]:
        try:
            return await service.evaluate(
                args.model,
                rows=rows,
                metrics=args.metrics,
                fmt=args.format,
                max_tokens=args.max_tokens,
            )
        finally:
            service.close()

    return asyncio.run(run())
