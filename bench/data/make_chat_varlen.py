"""Generate ``chat_varlen.jsonl``: a deterministic chat dataset of widely varying lengths.

    .venv/bin/python bench/data/make_chat_varlen.py [--rows 320] [--seed 7]

Used by ``bench/train_throughput.py``. Conversations are built from fixed word lists
with a seeded ``random.Random``, so the file is byte-identical on every machine. The
target length of each conversation is drawn log-uniformly between about 30 and 400
tokens (SmolLM2 tokenizer, chat template included), so batches padded to their longest
row carry a lot of padding, the case packing is meant for. Some rows have a system
message, some have two user/assistant exchanges.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

SUBJECTS = [
    "the river",
    "a small bakery",
    "the old library",
    "our garden",
    "the train station",
    "a mountain village",
    "the school orchestra",
    "a night market",
    "the harbour",
    "the city council",
    "a chess club",
    "the weather station",
    "a bicycle shop",
    "the museum",
    "a coffee farm",
    "the lighthouse",
    "a recycling plant",
    "the zoo",
]
VERBS = [
    "opens",
    "collects",
    "measures",
    "repairs",
    "builds",
    "paints",
    "sells",
    "studies",
    "cleans",
    "plans",
    "visits",
    "records",
    "moves",
    "shares",
    "counts",
    "grows",
]
OBJECTS = [
    "fresh bread",
    "wooden boats",
    "rain data",
    "old maps",
    "green tea",
    "new benches",
    "spare parts",
    "winter coats",
    "local honey",
    "paper lanterns",
    "stone walls",
    "summer fruit",
    "music lessons",
    "bus tickets",
    "clay pots",
    "solar panels",
]
TAILS = [
    "every morning",
    "before the festival",
    "with help from volunteers",
    "on rainy days",
    "for the whole town",
    "at a fair price",
    "since last spring",
    "when the tide is low",
    "after school",
    "in the evening",
    "once a month",
    "during the holidays",
]
QUESTIONS = [
    "Can you describe what happens at {s}?",
    "Write a short note about {s}.",
    "What should a visitor know about {s}?",
    "Summarise a typical day at {s}.",
    "Explain how {s} works, step by step.",
    "Tell me a story about {s}.",
]
SYSTEMS = [
    "You are a concise assistant.",
    "You answer in plain, friendly English.",
    "You are a helpful guide for visitors.",
]
# Rough tokens per generated sentence and the chat template's fixed cost (SmolLM2).
TOKENS_PER_SENTENCE = 10
TEMPLATE_TOKENS = 36


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
    return text[0].upper() + text[1:] + "."


def answer(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(max(1, sentences)))


def conversation(rng: random.Random, target_tokens: int) -> dict:
    """One chat row whose length is close to ``target_tokens``."""
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    body = max(1, (target_tokens - TEMPLATE_TOKENS) // TOKENS_PER_SENTENCE)
    turns = 2 if body >= 12 and rng.random() < 0.3 else 1
    for turn in range(turns):
        question = rng.choice(QUESTIONS).format(s=rng.choice(SUBJECTS))
        messages.append({"role": "user", "content": question})
        share = body // turns if turn < turns - 1 else body - (body // turns) * (turns - 1)
        messages.append({"role": "assistant", "content": answer(rng, share - 1)})
    return {"messages": messages}


def make_rows(rows: int, seed: int, low: int = 30, high: int = 400) -> list[dict]:
    """``rows`` conversations with log-uniform target lengths in ``[low, high]`` tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        target = math.exp(rng.uniform(math.log(low), math.log(high)))
        out.append(conversation(rng, int(target)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).with_name("chat_varlen.jsonl")))
    args = parser.parse_args()
    rows = make_rows(args.rows, args.seed)
    with open(args.out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
