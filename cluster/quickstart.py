"""The quick-start job: train, evaluate before/after, serve, ask.

    python -m rayft.cluster.quickstart configs/extract-lora.yaml [key=value ...]

On one Ray cluster (embedded unless ``--address``/``RAY_ADDRESS``), it fine-tunes the
spec's model, compares the base model and the new adapter on the eval set (teacher-forced
loss and perplexity, then exact match and token F1 of greedy answers), and finally serves
both behind the OpenAI-compatible endpoint and prints their answers to one prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

GENERATION_METRICS = ["loss", "perplexity", "exact_match", "token_f1"]


def evaluate_models(
    names: list[str], base: str, rows: list[dict], max_tokens: int
) -> dict[str, dict]:
    """Evaluate each of ``names`` (the base and/or adapters of ``base``) in this process."""
    from rayft.serving.engine import ModelEngine
    from rayft.serving.service import ModelService

    engine = ModelEngine(base, max_loaded_adapters=len(names), dtype="auto")
    service = ModelService(engine)

    async def run() -> dict[str, dict]:
        try:
            return {
                name: await service.evaluate(
                    name, rows=rows, metrics=GENERATION_METRICS, fmt="auto", max_tokens=max_tokens
                )
                for name in names
            }
        finally:
            service.close()

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayft.cluster.quickstart", description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--address", default=None)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show Ray's worker logs and warnings"
    )
    parser.add_argument(
        "--prompt",
        default=(
            "Extract the person's name, age, city and job from the text as JSON.\n\n"
            "Text: Last spring, Hana Okafor (41) opened a bakery in Quito, where she works as a baker."
        ),
    )
    args = parser.parse_args(argv)

    import rayft
    from rayft.cluster.api import resolve_spec, stop_serving
    from rayft.cluster.connect import connected
    from rayft.cluster.console import configure
    from rayft.serving.client import ask
    from rayft.serving.evaluation import read_rows

    configure(verbose=args.verbose)
    spec = resolve_spec(args.config, args.overrides)
    if spec.data.eval is None:
        print("the quick-start job needs data.eval to compare before and after", file=sys.stderr)
        return 2
    start = time.time()
    base = spec.model.name
    # One cluster for all three steps: rayft.train and rayft.serve use the one connected here.
    with connected(args.address):
        adapter = rayft.train(spec).artifact.name
        eval_path = spec.data.eval if isinstance(spec.data.eval, str) else spec.data.eval[0]
        rows = read_rows(Path(eval_path))
        print(
            f"[rayft] generating answers for {len(rows)} eval rows, base and adapter ...",
            file=sys.stderr,
            flush=True,
        )
        results = evaluate_models([base, adapter], base, rows, args.max_tokens)
        print_comparison(base, adapter, results)
        url = rayft.serve(base, max_loaded_adapters=1, show_progress=False)
        try:
            key = os.environ.get("RAYFT_API_KEY")
            base_answer = ask(url, base, args.prompt, 64, key)
            adapter_answer = ask(url, adapter, args.prompt, 64, key)
        finally:
            stop_serving()
    print("\n== served through the OpenAI-compatible endpoint, same prompt, greedy")
    print(f"prompt: {args.prompt!r}")
    print(f"[{base}] {base_answer}")
    print(f"[{adapter}] {adapter_answer}")
    print(f"\ntotal time {time.time() - start:.0f} s")
    return 0


def print_comparison(base: str, adapter: str, results: dict[str, dict[str, Any]]) -> None:
    before, after = results[base]["metrics"], results[adapter]["metrics"]
    print(f"\n== eval set ({results[base]['rows']} rows): base model vs fine-tuned adapter")
    print(f"{'metric':<14}{'before':>12}{'after':>12}")
    for key in ("loss", "perplexity", "exact_match", "token_f1"):
        if key in before and key in after:
            print(f"{key:<14}{before[key]:>12.4f}{after[key]:>12.4f}")
    print(json.dumps({"before": results[base], "after": results[adapter]}, default=str))


if __name__ == "__main__":
    sys.exit(main())
