"""``rayft eval --benchmarks``: lm-evaluation-harness tasks against a served model.

Against a running endpoint (``url``), lm-eval's ``local-completions`` model talks to its
``/v1/completions``. Without one, the model is served here, in this process, on a free
loopback port, behind a one-time API key, by the same app a Serve replica runs
(``serving.openai_api.create_api``), for the length of the run. Either way lm-eval
tokenizes with the served base model's tokenizer, read from the rayft root (or
``tokenizer``), so nothing is downloaded.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rayft.cluster.errors import UserError
from rayft.trainers.benchmarks import benchmark_problems, run_benchmarks, served_model_args
from rayft.trainers.manifest import BenchmarkScores
from rayft.trainers.storage import StorageRoot

SERVER_START_S = 60.0


def benchmark(
    model: str,
    tasks: list[str],
    *,
    url: str | None = None,
    root: StorageRoot,
    tokenizer: str | None = None,
    tasks_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    samples_out: Path | None = None,
) -> dict[str, BenchmarkScores]:
    """Score ``model`` (base or adapter name) on lm-eval ``tasks``; scores per task.

    Args:
        model: The name the server answers to.
        tasks: Task names: rayft's (``trainers.benchmarks.SHIPPED_TASKS``) or ``tasks_dir``'s.
        url: A running rayft endpoint; ``None`` serves the model in this process.
        root: The rayft root.
        tokenizer: The served base model's tokenizer directory (default: the base model's
            directory in the rayft root).
        tasks_dir: A local folder of more lm-eval task YAML files.
        limit: At most this many documents per task.
        batch_size: Prompts per request.
        dtype: The model's dtype when served in this process.
        samples_out: Where lm-eval's per-document records go (``<task>.jsonl``).

    Raises:
        UserError: Unknown tasks, or a model with no local tokenizer.
        BenchmarkError: lm-eval failed.
    """
    problems = benchmark_problems(tasks, tasks_dir, folder_key="--tasks-dir")
    if problems:
        raise UserError("; ".join(problems))
    run = {"tasks": tasks, "tasks_dir": tasks_dir, "limit": limit, "batch_size": batch_size}
    if url is not None:
        base_dir = Path(tokenizer) if tokenizer else _base_dir(model, root)
        args = served_model_args(url, model, base_dir, _context_window(base_dir))
        key = os.environ.get("RAYFT_API_KEY")
        if key:
            args["header"] = {"Authorization": f"Bearer {key}"}
        return run_benchmarks(model_args=args, samples_out=samples_out, **run)
    with served_here(model, root, dtype) as (local_url, key, engine):
        args = served_model_args(
            local_url, model, tokenizer or engine.model_dir, engine.context_window
        )
        args["header"] = {"Authorization": f"Bearer {key}"}
        return run_benchmarks(model_args=args, samples_out=samples_out, **run)


def served_base(model: str, root: StorageRoot) -> str:
    """The base model a name is served on: an adapter's ``base_model``, else the name."""
    from rayft.trainers.registry import ArtifactManifest, RegistryError, sync_adapter

    try:
        adapter_dir = sync_adapter(model, root)
    except RegistryError:  # not an adapter name (a hub id or a path): the model is the base
        return model
    if not (adapter_dir / "adapter_config.json").is_file():
        return model
    manifest = ArtifactManifest.find(adapter_dir)
    return (manifest.base_model if manifest is not None else None) or model


def _base_dir(model: str, root: StorageRoot) -> Path:
    from rayft.trainers.models import ModelError, resolve_model

    base = served_base(model, root)
    try:
        return resolve_model(base, root.models, root)
    except ModelError as err:
        raise UserError(
            f"no local tokenizer for {model!r} (base {base!r}): {err}; pass --tokenizer DIR"
        ) from None


def _context_window(model_dir: Path) -> int:
    import json

    config = model_dir / "config.json"
    if config.is_file():
        window = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(window, int) and window > 0:
            return window
    return 2048


@contextmanager
def served_here(
    model: str, root: StorageRoot, dtype: str = "auto"
) -> Iterator[tuple[str, str, Any]]:
    """Serve ``model`` (base or adapter) on a free loopback port in this process.

    Yields:
        The base URL, the one-time API key every request needs, and the ``ModelEngine``.
    """
    import uvicorn

    from rayft.serving.client import free_port
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    engine = ModelEngine(served_base(model, root), storage=root, max_loaded_adapters=1, dtype=dtype)
    key = secrets.token_urlsafe(24)
    service = ModelService(engine, api_key=key)
    port = free_port()
    config = uvicorn.Config(
        create_api(service), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="rayft-benchmark-http", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the benchmark's HTTP server on {url} did not start")
            time.sleep(0.05)
        yield url, key, engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.close()
