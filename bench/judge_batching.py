"""Model-grader judge calls: made at once and batched, against the same calls one at a time.

    RAYFT_HOME=/tmp/rfhome .venv/bin/python bench/judge_batching.py [--calls 16]
        [--max-tokens 16] [--model smollm2-135m-instruct] [--rounds 3] [--json OUT]

A GRPO run with a ``score_model`` or ``label_model`` grader asks its judge once per sampled
answer, from the grading threads (``trainers/grpo.py``), all at about the same time. Both
arms use one ``LocalJudge`` (``trainers/rollout.py``), the judge's engine loaded before
anything is timed, greedy replies of at most ``--max-tokens`` tokens to ``--calls``
different grading prompts:

  (a) batched: the calls come from ``--calls`` threads at once, as the grading threads
      make them; ``BatchDecoder`` decodes those that queue while the engine is busy as
      one batch;
  (b) one at a time (the peer): the same calls, one after the other from one thread, so
      each is decoded alone, as before judge calls were batched.

Each arm runs ``--rounds`` times, alternating; the median wall time of each is compared.
The arms' replies are checked to be the same. The last line is
``judge_batching_speedup=<one at a time / batched wall time>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path


def prompts(calls: int) -> list[list[dict[str, str]]]:
    return [
        [
            {
                "role": "user",
                "content": (
                    f"Rate from 0 to 10 how well the answer '{a + b}' answers "
                    f"'What is {a} + {b}?'. Reply with only the number."
                ),
            }
        ]
        for a, b in ((i % 10, (3 * i) % 10) for i in range(calls))
    ]


def batched(judge, model: str, messages: list, params) -> tuple[float, list[str]]:
    replies: dict[int, str] = {}

    def call(index: int) -> None:
        replies[index] = judge(model, messages[index], params).text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(messages))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, [replies[i] for i in range(len(messages))]


def one_at_a_time(judge, model: str, messages: list, params) -> tuple[float, list[str]]:
    start = time.perf_counter()
    replies = [judge(model, m, params).text for m in messages]
    return time.perf_counter() - start, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from rayft.trainers.graders import SamplingParams
    from rayft.trainers.rollout import LocalJudge
    from rayft.trainers.storage import StorageRoot

    judge = LocalJudge(StorageRoot.resolve(), dtype="float32")
    params = SamplingParams(max_completions_tokens=args.max_tokens, temperature=0)
    messages = prompts(args.calls)
    judge(args.model, messages[0], params)  # load the engine before timing
    _, decoder = judge._engine(args.model)
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    replies: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, arm in (("batched", batched), ("one_at_a_time", one_at_a_time)):
            seconds, replies[name] = arm(judge, args.model, messages, params)
            times[name].append(seconds)
            print(f"{name}: {seconds:.2f} s for {args.calls} calls", flush=True)
    if replies["batched"] != replies["one_at_a_time"]:
        raise SystemExit("the arms' replies differ")
    medians = {name: statistics.median(t) for name, t in times.items()}
    speedup = medians["one_at_a_time"] / medians["batched"]
    result = {
        "calls": args.calls,
        "max_tokens": args.max_tokens,
        "model": args.model,
        "seconds": times,
        "median_s": medians,
        "batch_sizes": decoder.batches,
        "judge_batching_speedup": speedup,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"batches decoded: {decoder.batches}")
    print(f"judge_batching_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
