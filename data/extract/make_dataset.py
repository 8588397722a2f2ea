"""Build the person-record extraction task shipped with rayft (deterministic).

Each chat asks for the person described in one sentence as a compact JSON object
with fixed keys. SmolLM2-135M-Instruct answers in prose or with other keys before
fine-tuning; a short LoRA run teaches it the exact format.

    python data/extract/make_dataset.py   # rewrites train.jsonl and eval.jsonl here
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = [
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Elif",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Keiko",
    "Liam",
    "Maya",
    "Nikolai",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zoe",
]
LAST = [
    "Smith",
    "Garcia",
    "Nakamura",
    "Okafor",
    "Novak",
    "Rossi",
    "Dubois",
    "Jensen",
    "Kowalski",
    "Haddad",
    "Silva",
    "Larsen",
    "Moreau",
    "Petrov",
    "Tanaka",
    "Weber",
]
CITIES = [
    "Paris",
    "Lagos",
    "Osaka",
    "Lima",
    "Oslo",
    "Cairo",
    "Dublin",
    "Austin",
    "Porto",
    "Seoul",
    "Krakow",
    "Nairobi",
    "Denver",
    "Milan",
    "Hanoi",
    "Quito",
]
JOBS = [
    "engineer",
    "teacher",
    "nurse",
    "chef",
    "pilot",
    "lawyer",
    "farmer",
    "designer",
    "plumber",
    "dentist",
    "librarian",
    "architect",
    "baker",
    "journalist",
]
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}: {age} years old, working as a {job} in {city}.",
    "Living in {city}, {name} ({age}) earns a living as a {job}.",
    "{name}, aged {age}, moved to {city} last year to work as a {job}.",
    "In {city} there is a {job} named {name}, who is {age}.",
    "At {age}, {name} already runs a busy practice as a {job} in {city}.",
    "Our new neighbour in {city} is {name}, a {job} of {age}.",
    "{name} has been a {job} in {city} since turning {age}.",
]
INSTRUCTION = "Extract the person's name, age, city and job from the text as JSON.\n\nText: "


def make_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        person = {
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "age": rng.randint(19, 78),
            "city": rng.choice(CITIES),
            "job": rng.choice(JOBS),
        }
        text = rng.choice(TEMPLATES).format(**person)
        answer = json.dumps(person, separators=(", ", ": "))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": INSTRUCTION + text},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(20261122)
    for name, count in (("train.jsonl", 480), ("eval.jsonl", 48)):
        with open(here / name, "w") as handle:
            for row in make_rows(count, rng):
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
