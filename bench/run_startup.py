"""A short run's wall time against a peer way of running it: data prepared in the driver
against Ray Data's way, or rayft's controller polling against Ray Train's default.

    RAYFT_HOME=/tmp/rfhome .venv/bin/python bench/run_startup.py [--compare prepare|polling]
        [--rows 40] [--steps 2] [--workers 1] [--rounds 3] [--json OUT]

``--compare prepare`` (the default): small fine-tuning sets are prepared in the driver by
default (``data.prepare: auto``): the rows the scan already read are tokenised there and the
table goes to the workers through the object store (``trainers/shards.py``). The peer is
``data.prepare: ray``, every run's way before: Ray Data's read and tokenize tasks,
materialised by the driver, and Ray Train's split coordinator feeding the workers.

``--compare polling``: rayft's controller polls the workers every 0.5 s
(``trainers.startup.POLL_INTERVAL_S``); the peer is Ray Train's default, 2 s
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2``), which a user's environment can still set.

Both arms run ``rayft.train`` on one embedded local Ray cluster (started before anything is
timed, then warmed by one untimed run of each arm), the same spec otherwise: ``tiny-llama``,
LoRA, ``--rows`` chat rows, ``--steps`` optimizer steps of batch 2, ``--workers`` workers,
no evaluation. They alternate for ``--rounds`` rounds; each run is timed from the call to
its return (published adapter included), and the medians are compared. The last line is
``run_startup_speedup=<peer median / rayft median>``.
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
    parser.add_argument("--compare", choices=sorted(ARMS), default="prepare")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import rayft
    from rayft.cluster.connect import connect
    from rayft.trainers.startup import POLL_INTERVAL_ENV

    data = write_rows(Path(tempfile.mkdtemp()) / "rows.jsonl", args.rows)
    connect(None)
    arms = ARMS[args.compare]

    def run(arm: str, index: int) -> float:
        prepare, poll = arms[arm]
        spec = {
            "model": {"name": "tiny-llama"},
            "data": {"train": str(data), "prepare": prepare},
            "method": "lora",
            "optim": {"max_steps": args.steps, "batch_size": 2},
            "scaling": {"num_workers": args.workers},
            "output": {
                "name": f"startup-{args.compare}-{list(arms).index(arm)}-{index}",
                "overwrite": True,
            },
        }
        if poll is None:
            os.environ.pop(POLL_INTERVAL_ENV, None)
        else:
            os.environ[POLL_INTERVAL_ENV] = poll
        start = time.perf_counter()
        rayft.train(spec, show_progress=False)
        return time.perf_counter() - start

    for arm in arms:
        run(arm, 0)  # warm-up: imports, caches, Ray's worker pool
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for index in range(1, args.rounds + 1):
        for arm in arms:
            seconds = run(arm, index)
            times[arm].append(seconds)
            print(f"{arm}: {seconds:.1f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    rayft_arm, peer = arms
    speedup = medians[peer] / medians[rayft_arm]
    if args.json:
        args.json.write_text(
            json.dumps(
                {**vars(args), "json": None, "seconds": times, "median_s": medians}, indent=2
            )
        )
    print(", ".join(f"median {arm} {medians[arm]:.1f} s" for arm in arms))
    print(f"run_startup_speedup={speedup:.2f}")


ARMS: dict[str, dict[str, tuple[str, str | None]]] = {
    # arm: (data.prepare, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S or None for rayft's); rayft's first
    "prepare": {"data.prepare=driver": ("driver", None), "data.prepare=ray": ("ray", None)},
    "polling": {"poll 0.5 s (rayft)": ("auto", None), "poll 2 s (Ray's default)": ("auto", "2")},
}


if __name__ == "__main__":
    main()
