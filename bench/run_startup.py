"""A short run's wall time with its data prepared in the driver, against Ray Data's way.

    RAYFT_HOME=/tmp/rfhome .venv/bin/python bench/run_startup.py [--rows 40] [--steps 2]
        [--workers 1] [--rounds 3] [--json OUT]

Small fine-tuning sets are prepared in the driver by default (``data.prepare: auto``): the
rows the scan already read are tokenised there and the table goes to the workers through
the object store (``trainers/shards.py``). The peer is ``data.prepare: ray``, every run's
way before: Ray Data's read and tokenize tasks, materialised by the driver, and Ray
Train's split coordinator feeding the workers.

Both arms run ``rayft.train`` on one embedded local Ray cluster (started before anything is
timed, then warmed by one untimed run of each arm), the same spec otherwise: ``tiny-llama``,
LoRA, ``--rows`` chat rows, ``--steps`` optimizer steps of batch 2, ``--workers`` workers,
no evaluation. They alternate for ``--rounds`` rounds; each run is timed from the call to
its return (published adapter included), and the medians are compared. The last line is
``run_startup_speedup=<ray median / driver median>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

COLORS = [("red", "apple"), ("blue", "sky"), ("green", "grass"), ("white", "snow")]


def write_rows(path: Path, rows: int) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            color, thing = COLORS[i % len(COLORS)]
            messages = [
                {"role": "user", "content": f"name a {color} thing, number {i}"},
                {"role": "assistant", "content": f"the {thing} is {color}"},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import rayft
    from rayft.cluster.connect import connect

    data = write_rows(Path(tempfile.mkdtemp()) / "rows.jsonl", args.rows)
    connect(None)

    def run(prepare: str, index: int) -> float:
        spec = {
            "model": {"name": "tiny-llama"},
            "data": {"train": str(data), "prepare": prepare},
            "method": "lora",
            "optim": {"max_steps": args.steps, "batch_size": 2},
            "scaling": {"num_workers": args.workers},
            "output": {"name": f"startup-{prepare}-{index}", "overwrite": True},
        }
        start = time.perf_counter()
        rayft.train(spec, show_progress=False)
        return time.perf_counter() - start

    run("driver", 0), run("ray", 0)  # warm-up: imports, caches, Ray's worker pool
    times: dict[str, list[float]] = {"driver": [], "ray": []}
    for index in range(1, args.rounds + 1):
        for prepare in ("driver", "ray"):
            seconds = run(prepare, index)
            times[prepare].append(seconds)
            print(f"data.prepare={prepare}: {seconds:.1f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    speedup = medians["ray"] / medians["driver"]
    if args.json:
        args.json.write_text(
            json.dumps(
                {**vars(args), "json": None, "seconds": times, "median_s": medians}, indent=2
            )
        )
    print(f"median: driver {medians['driver']:.1f} s, ray {medians['ray']:.1f} s")
    print(f"run_startup_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
