"""Overhead of the fine-tuning jobs API against ``rayft train``: request to servable model.

    .venv/bin/python bench/jobs_overhead.py [--model tiny-llama] [--rows 64] [--steps 30]

One local Ray cluster serves the rayft app. The same small LoRA job is run twice on it:

  (a) API: ``files.create`` + ``fine_tuning.jobs.create`` with the official ``openai``
      client, polling ``jobs.retrieve`` every 0.5 s;
  (b) CLI: ``rayft train SPEC --address <the serving cluster>`` as a subprocess (it
      trains and publishes), the same spec the API built for (a);

each timed from the request (or the command's start) to the first successful
``chat.completions`` answer of the new model on the serving endpoint. By default the CLI
runs second, so it meets a warm cluster (Ray Data's first run on a fresh cluster is
slower: an advantage to the peer); ``--cli-first`` swaps the order.
Target: the API adds under 10 % or under 30 s. The last line is ``api_vs_cli=<ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

COLORS = [("red", "apple"), ("blue", "sky"), ("green", "grass"), ("white", "snow")]


def write_data(path: Path, rows: int) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            color, thing = COLORS[i % len(COLORS)]
            messages = [
                {"role": "user", "content": f"name a {color} thing"},
                {"role": "assistant", "content": f"the {thing} is {color}"},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def options(steps: int) -> dict:
    """The job's rayft settings (everything but model, data and output)."""
    return {
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {
            "max_steps": steps,
            "batch_size": 4,
            "lr": 3e-2,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
        },
        "data": {"format": "chat", "max_seq_len": 64},
        "scaling": {"num_workers": 1},
        "eval": {"at_start": False},
        "checkpoint": {"every_steps": steps},
    }


def first_answer(client, model: str, timeout_s: float = 120) -> None:
    """Block until ``model`` answers a chat completion."""
    import openai

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "name a red thing"}],
                max_tokens=4,
                temperature=0,
            )
            return
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def via_api(client, data: Path, model: str, steps: int) -> tuple[float, dict]:
    start = time.perf_counter()
    with open(data, "rb") as handle:
        file_id = client.files.create(file=handle, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=model, training_file=file_id, extra_body={"rayft": options(steps)}
    )
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        raise RuntimeError(f"API job {job.id} ended {job.status}: {job.error}")
    first_answer(client, job.fine_tuned_model)
    return time.perf_counter() - start, job.model_extra["rayft"]["spec"]


def cli_spec(model: str, data: Path, steps: int) -> dict:
    """The spec the API builds for the same job (without running it first)."""
    return {
        **options(steps),
        "model": {"name": model},
        "data": {**options(steps)["data"], "train": str(data)},
    }


def via_cli(client, spec: dict, home: Path, address: str) -> float:
    spec = {**spec, "output": {"name": "bench-cli-adapter"}}
    spec.pop("storage", None)
    path = home / "bench-cli.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    rayft = Path(sys.executable).with_name("rayft")
    start = time.perf_counter()
    subprocess.run(
        [str(rayft), "train", str(path), "--address", address, f"storage={home}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    first_answer(client, "bench-cli-adapter")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--storage", default=None, help="rayft root (default: a temporary one)")
    parser.add_argument("--cli-first", action="store_true", help="run (b) before (a)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    home = Path(args.storage or tempfile.mkdtemp(prefix="rayft-bench-"))
    os.environ["RAYFT_HOME"] = str(home)
    data = write_data(home / "colors.jsonl", args.rows)

    import openai
    import ray
    from ray import serve

    from rayft.cluster.service_app import ROUTERS
    from rayft.serving.client import run_app

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"RAYFT_HOME": str(home)}},
    )
    try:
        url = run_app(
            {"model": args.model, "storage": str(home), "dtype": "float32"}, routers=ROUTERS
        )
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        address = ray.get_runtime_context().gcs_address
        if args.cli_first:
            cli_s = via_cli(client, cli_spec(args.model, data, args.steps), home, address)
        api_s, spec = via_api(client, data, args.model, args.steps)
        if not args.cli_first:
            cli_s = via_cli(client, spec, home, address)
        print(f"(a) POST /v1/fine_tuning/jobs -> servable: {api_s:.1f} s", flush=True)
        print(f"(b) rayft train --address -> servable:     {cli_s:.1f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"api_overhead_s={api_s - cli_s:.1f}")
    print(f"api_vs_cli={api_s / cli_s:.3f}")


if __name__ == "__main__":
    main()
