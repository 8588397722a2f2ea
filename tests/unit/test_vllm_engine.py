"""The vLLM engine's parts that need no vLLM server: choosing the engine, the server's
command line, the serve arguments, and turning vLLM's stream into rayft's step outputs."""

from __future__ import annotations

import sys
import threading
from collections import deque

import pytest

from rayft.serving.engine import StepOutput
from rayft.serving.vllm_engine import (
    VLLM_PYTHON_ENV,
    VllmEngine,
    VllmServer,
    VllmUnavailable,
    _Flight,
    _top,
    find_vllm_python,
    pick_engine,
)


def test_the_engine_argument_picks_native_on_a_cpu_and_names_a_missing_interpreter():
    assert pick_engine("native") == "native"
    assert pick_engine("auto") == "native"  # no GPU here: the native engine batches faster
    with pytest.raises(VllmUnavailable, match="vllm_python='/nowhere/python'"):
        pick_engine("vllm", "/nowhere/python")
    assert pick_engine("vllm", sys.executable) == "vllm"


def test_the_interpreter_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv(VLLM_PYTHON_ENV, "/from/env/python")
    assert find_vllm_python("/given/python") == "/given/python"
    assert find_vllm_python() == "/from/env/python"


def test_the_server_listens_on_loopback_with_lora_slots(tmp_path):
    server = VllmServer("python", tmp_path, max_loras=3, max_lora_rank=32, dtype="float32",
                        max_model_len=512)  # fmt: skip
    cmd = server.command()
    flags = {
        arg: (cmd[i + 1] if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else None)
        for i, arg in enumerate(cmd)
        if arg.startswith("--")
    }
    assert cmd[1].endswith("vllm_launch.py")
    assert flags["--host"] == "127.0.0.1" and flags["--max-loras"] == "3"
    assert flags["--max-lora-rank"] == "32" and flags["--served-model-name"] == "__base__"
    assert "--enable-lora" in cmd and "--enforce-eager" in cmd  # no CUDA graphs on a CPU


def test_without_lora_the_server_has_no_lora_slots(tmp_path):
    server = VllmServer("python", tmp_path, max_loras=3, max_lora_rank=16, dtype="bfloat16",
                        max_model_len=512, lora=False)  # fmt: skip
    cmd = server.command()
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank"} & set(cmd)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"


def test_on_a_cpu_vllm_decodes_on_the_replicas_cores_unless_the_environment_names_them(
    tmp_path, monkeypatch
):
    import os

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so")
    first = sorted(os.sched_getaffinity(0))[:1]
    server = VllmServer("python", tmp_path, max_loras=1, max_lora_rank=16, dtype="float32",
                        max_model_len=512, cpus=1)  # fmt: skip
    env = server.environment()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(first[0]) and env["OMP_NUM_THREADS"] == "1"
    assert "LD_PRELOAD" not in env and env["VLLM_HOST_IP"] == "127.0.0.1"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the operator's choice wins
    assert server.environment()["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    server.cpus = 0  # vLLM's own binding
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server.environment()
    # vLLM's development routes (/collective_rpc) open only for a rollout engine's reloads.
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    assert "VLLM_SERVER_DEV_MODE" not in server.environment()
    server.weight_reload = True
    assert server.environment()["VLLM_SERVER_DEV_MODE"] == "1"


def routing_engine(tmp_path, lora: bool, max_lora_rank: int = 16) -> VllmEngine:
    """A VllmEngine with only what ``runs_natively`` uses (no model, no server)."""
    engine = object.__new__(VllmEngine)
    engine.server = VllmServer("python", tmp_path, 1, max_lora_rank, "float32", 512, lora=lora)
    engine.max_lora_rank = max_lora_rank
    engine._memory, engine._in_memory, engine._routes = {}, {}, {}
    return engine


def served_adapter(tmp_path, name: str, config: dict):
    import json

    from rayft.serving.engine import ServedAdapter
    from rayft.trainers.manifest import ArtifactManifest

    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return ServedAdapter(name, "v1", folder, ArtifactManifest(kind="adapter", base_model="m"))


def test_adapters_route_to_the_native_engine_by_rank_dora_and_lora_off(tmp_path, caplog):
    from rayft.serving.engine import BASE_ADAPTER

    lora = {"r": 16, "target_modules": ["q_proj"]}
    plain = served_adapter(tmp_path, "plain", lora)
    wide = served_adapter(tmp_path, "wide", {**lora, "rank_pattern": {"q_proj": 32}})
    dora = served_adapter(tmp_path, "dora", {**lora, "use_dora": True})
    engine = routing_engine(tmp_path, lora=True)
    assert not engine.runs_natively(BASE_ADAPTER)
    assert not engine.runs_natively("plain", plain)
    with caplog.at_level("WARNING", logger="rayft.serving.vllm_engine"):
        assert engine.runs_natively("wide", wide)
    assert "rank 32, above max_lora_rank 16" in caplog.text
    assert engine.runs_natively("dora", dora)
    off = routing_engine(tmp_path, lora=False)
    assert not off.runs_natively(BASE_ADAPTER)
    assert off.runs_natively("plain", plain)
    with pytest.raises(ValueError, match="without LoRA"):
        off.set_adapter_weights("policy", {}, {})
    with pytest.raises(NotImplementedError, match="weight_reload"):
        engine.set_base_weights({})


def test_serve_arguments_name_a_bad_engine_and_rank():
    from rayft.serving.app import parse_args
    from rayft.trainers.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_args({"engine": "tgi", "max_lora_rank": 0})
    assert {"engine", "max_lora_rank"} <= set(dict(err.value.problems))
    args = parse_args({"engine": "vllm", "vllm_lora": False})
    assert args.engine == "vllm" and args.vllm_lora is False
    assert args.max_lora_rank == 16  # vLLM's own default, and rayft's training rank


def test_rayft_serve_with_engine_vllm_and_no_vllm_fails_before_ray_starts():
    import ray

    import rayft
    from rayft.cluster.errors import UserError

    with pytest.raises(UserError, match="vllm_python"):
        rayft.serve("tiny-llama", engine="vllm", vllm_python="/nowhere/python")
    assert not ray.is_initialized()


def stream_engine() -> VllmEngine:
    """A VllmEngine with only what ``_chunk`` and ``_emit`` use (no model, no server)."""
    engine = object.__new__(VllmEngine)
    engine._flights, engine._outbox, engine._arrived = {}, deque(), threading.Condition()
    return engine


def test_a_streamed_chunk_becomes_one_output_per_token_with_its_text_on_the_last():
    engine = stream_engine()
    flight = _Flight(request=None, lora=None)  # type: ignore[arg-type]
    engine._flights[7] = flight
    first = {"choices": [{"text": "Hello", "token_ids": [11, 12], "finish_reason": None}]}
    last = {"choices": [{"text": " sky", "token_ids": [13], "finish_reason": "length"}]}
    usage_only = {"choices": [], "usage": {"completion_tokens": 3}}
    for chunk in (first, last, usage_only):
        engine._chunk(7, flight, 5, chunk)
    outs = list(engine._outbox)
    assert [o.token for o in outs] == [11, 12, 13]
    assert [o.text for o in outs] == ["", "Hello", " sky"]
    assert [o.completion_tokens for o in outs] == [1, 2, 3]
    assert outs[-1] == StepOutput(7, " sky", True, "length", 5, 3, None, 13)
    assert 7 not in engine._flights  # finished rows leave
    with pytest.raises(Exception, match="vLLM failed the row"):
        engine._chunk(8, flight, 5, {"error": {"message": "boom"}})


def test_top_logprobs_keep_vllms_rank_order_up_to_k():
    position = {
        "5": {"logprob": -0.1, "rank": 1},
        "9": {"logprob": -3.0, "rank": 3},
        "7": {"logprob": -1.0, "rank": 2},
    }
    assert _top(position, 2) == [(5, -0.1), (7, -1.0)]
    assert _top(position, 0) == []
