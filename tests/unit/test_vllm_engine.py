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


def test_serve_arguments_name_a_bad_engine_and_rank():
    from rayft.serving.app import parse_args
    from rayft.trainers.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_args({"engine": "tgi", "max_lora_rank": 0})
    assert {"engine", "max_lora_rank"} <= set(dict(err.value.problems))
    assert parse_args({"engine": "vllm"}).engine == "vllm"


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
