"""Serving throughput: mixed-adapter batching against base-only and a one-at-a-time loop.

    .venv/bin/python bench/serve_throughput.py [--model tiny-llama] [--clients 8]
        [--requests-per-client 4] [--max-tokens 32] [--replica-cpus 2] [--vllm]

N concurrent clients each send requests one after another, rotating over 4 adapters
and the base model, and the benchmark reports generated tokens/s and p50/p99 request
latency for:

  (a) rayft over HTTP, requests mixed across 4 adapters + base (one forward pass per
      step for all of them);
  (b) rayft over HTTP, the same requests all on the base model;
  (c) a plain transformers + PEFT server loop in this process that serves one request
      at a time (``set_adapter`` then ``generate``), with the same torch thread count as
      the replica and no HTTP overhead (an advantage to the peer).

The adapters are LoRA r=8 on all linear layers with random B matrices (fixed seeds),
so every adapter really changes the computation. Greedy decoding; generated token
counts come from the server's ``usage``. Targets: (a) >= 0.8x (b) and >= 3x (c).
With ``--vllm`` the same app serves on vLLM (``engine=vllm``) in the same run: (d) mixed
and (e) base only, reported as ``vllm_vs_native_mixed`` (d/a) and ``vllm_vs_native_base``
(e/b), and (f) base only on a vLLM deployment without LoRA layers (``vllm_lora=false``,
where adapters would run natively), reported as ``vllm_nolora_vs_native_base`` (f/b);
target: vLLM base >= 2x (b). The last line is ``mixed_vs_base=<ratio>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

ADAPTERS = ["bench-a0", "bench-a1", "bench-a2", "bench-a3"]
PROMPTS = [
    "name a red thing",
    "what is the capital of france",
    "write one sentence about the sea",
    "list three numbers",
]


def make_adapters(model: str, home: Path) -> None:
    """Publish four random LoRA adapters of ``model`` under ``home``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.trainers.manifest import ArtifactManifest
    from rayft.trainers.models import resolve_model
    from rayft.trainers.storage import StorageRoot

    model_dir = resolve_model(model, StorageRoot.resolve(str(home)).models)
    for index, name in enumerate(ADAPTERS):
        out = home / "adapters" / name
        if out.is_dir():
            continue
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_model = get_peft_model(
            base, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
        )
        generator = torch.Generator().manual_seed(100 + index)
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.data = torch.randn(param.shape, generator=generator) * 0.02
        peft_model.save_pretrained(out)
        ArtifactManifest(kind="adapter", base_model=model).write(out)


def workload(model: str, clients: int, per_client: int, mixed: bool) -> list[list[tuple[str, str]]]:
    """Per client, the (model, prompt) pairs it sends in order."""
    names = ADAPTERS + [model] if mixed else [model]
    plan = []
    for client in range(clients):
        rows = []
        for k in range(per_client):
            i = client * per_client + k
            rows.append((names[i % len(names)], PROMPTS[i % len(PROMPTS)]))
        plan.append(rows)
    return plan


def summarize(label: str, tokens: int, latencies: list[float], wall: float) -> dict[str, float]:
    latencies = sorted(latencies)
    p99_index = min(len(latencies) - 1, max(0, round(0.99 * len(latencies)) - 1))
    result = {
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[p99_index],
        "tokens": tokens,
        "requests": len(latencies),
        "wall_s": wall,
    }
    print(
        f"{label:<34} {result['tokens_per_s']:8.1f} tok/s   p50 {result['p50_s']:6.3f} s   "
        f"p99 {result['p99_s']:6.3f} s   ({tokens} tokens, {len(latencies)} requests, {wall:.1f} s)",
        flush=True,
    )
    return result


async def drive_http(
    url: str, plan: list[list[tuple[str, str]]], max_tokens: int
) -> tuple[int, list[float], float]:
    import httpx

    from rayft.serving.client import greedy_chat

    tokens = 0
    latencies: list[float] = []

    async def client(rows: list[tuple[str, str]], http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for model, prompt in rows:
            start = time.perf_counter()
            response = await http.post(
                f"{url}/v1/chat/completions", json=greedy_chat(model, prompt, max_tokens)
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(rows, http) for rows in plan))
        wall = time.perf_counter() - start
    return tokens, latencies, wall


def drive_serial(
    model: str, home: Path, plan: list[list[tuple[str, str]]], max_tokens: int, threads: int
) -> tuple[int, list[float], float]:
    """The peer: one request at a time through plain transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.trainers.models import resolve_model
    from rayft.trainers.storage import StorageRoot

    torch.set_num_threads(threads)
    model_dir = resolve_model(model, StorageRoot.resolve(str(home)).models)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(
        base, str(home / "adapters" / ADAPTERS[0]), adapter_name=ADAPTERS[0]
    )
    for name in ADAPTERS[1:]:
        peft_model.load_adapter(str(home / "adapters" / name), adapter_name=name)
    peft_model.eval()
    lock = asyncio.Lock()

    def generate(name: str, prompt: str) -> int:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            if name == model:
                with peft_model.disable_adapter():
                    out = peft_model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            else:
                peft_model.set_adapter(name)
                out = peft_model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        return int(out.shape[1] - ids["input_ids"].shape[1])

    async def run() -> tuple[int, list[float], float]:
        tokens = 0
        latencies: list[float] = []
        loop = asyncio.get_running_loop()

        async def client(rows: list[tuple[str, str]]) -> None:
            nonlocal tokens
            for name, prompt in rows:
                start = time.perf_counter()
                async with lock:  # the server handles one request at a time
                    tokens += await loop.run_in_executor(None, generate, name, prompt)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client(rows) for rows in plan))
        return tokens, latencies, time.perf_counter() - start

    return asyncio.run(run())


def http_arms(
    url: str, arms: list[tuple[str, bool]], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """``arms`` (label, mixed) against one served app, after a warm-up."""
    warm = workload(args.model, args.clients, 1, mixed=any(mixed for _, mixed in arms))
    asyncio.run(drive_http(url, warm, 4))  # loads every adapter once
    results = {}
    for label, mixed in arms:
        plan = workload(args.model, args.clients, args.requests_per_client, mixed)
        results[label] = summarize(label, *asyncio.run(drive_http(url, plan, args.max_tokens)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replica-cpus", type=int, default=2)
    parser.add_argument("--storage", default=None, help="rayft root (default: a temporary one)")
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also serve on vLLM (engine=vllm; a model vLLM's CPU kernels take, such as "
        "smollm2-135m-instruct) and report vLLM/native for the mixed and base arms",
    )
    parser.add_argument(
        "--vllm-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="vLLM's dtype (the native arms run float32)",
    )
    parser.add_argument(
        "--vllm-max-lora-rank",
        type=int,
        default=None,
        help="vLLM's max_lora_rank (default: the deployment's own)",
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    home = Path(args.storage or tempfile.mkdtemp(prefix="rayft-bench-"))
    os.environ["RAYFT_HOME"] = str(home)
    make_adapters(args.model, home)

    import ray
    from ray import serve

    from rayft.serving.client import run_app

    ray.init(
        address="local",
        num_cpus=max(4, args.replica_cpus + 1),
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={
            "env_vars": {"RAYFT_HOME": str(home), "OMP_NUM_THREADS": str(args.replica_cpus)}
        },
    )
    results: dict[str, dict[str, float]] = {}
    serve_args = {
        "model": args.model,
        "storage": str(home),
        "max_loaded_adapters": len(ADAPTERS),
        "dtype": "float32",
        "max_batch_size": max(16, args.clients),
        "num_cpus": args.replica_cpus,
        "max_tokens_limit": max(64, args.max_tokens),
    }
    vllm = {"engine": "vllm", "dtype": args.vllm_dtype}
    if args.vllm_max_lora_rank:
        vllm["max_lora_rank"] = args.vllm_max_lora_rank
    deployments = [
        ({"engine": "native"}, [("(a) rayft, 4 adapters + base mixed", True),
                                ("(b) rayft, base only", False)]),
        *([(vllm, [("(d) vLLM, 4 adapters + base mixed", True), ("(e) vLLM, base only", False)]),
           ({**vllm, "vllm_lora": False}, [("(f) vLLM without LoRA, base only", False)])]
          if args.vllm else []),
    ]  # fmt: skip
    try:
        for overrides, arms in deployments:
            url = run_app({**serve_args, **overrides})
            results.update(http_arms(url, arms, args))
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
    plan = workload(args.model, args.clients, args.requests_per_client, mixed=True)
    label = "(c) transformers+PEFT, one at a time"
    results[label] = summarize(
        label, *drive_serial(args.model, home, plan, args.max_tokens, args.replica_cpus)
    )

    rate = {k.split(") ", 1)[0] + ")": v["tokens_per_s"] for k, v in results.items()}
    a, b, c = rate["(a)"], rate["(b)"], rate["(c)"]
    print(
        f"settings: model={args.model} clients={args.clients} requests/client={args.requests_per_client} "
        f"max_tokens={args.max_tokens} replica_cpus={args.replica_cpus} (peer torch threads same)"
        + (f" vllm_dtype={args.vllm_dtype}" if args.vllm else "")
    )
    print(f"mixed_vs_serial={a / c:.2f}")
    if args.vllm:
        print(f"vllm_vs_native_base={rate['(e)'] / b:.2f}")
        print(f"vllm_nolora_vs_native_base={rate['(f)'] / b:.2f}")
        print(f"vllm_vs_native_mixed={rate['(d)'] / a:.2f}")
    print(f"mixed_vs_base={a / b:.2f}")


if __name__ == "__main__":
    main()
