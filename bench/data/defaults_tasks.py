"""Three small chat tasks for ``bench/defaults_quality.py``, built here, deterministically.

Each task is a list of train rows and a list of held-out rows in the chat format
(``{"messages": [user, assistant]}``), every answer one short line:

* ``extract``: the shipped person-record extraction task (``data/extract``): a sentence
  in, one compact JSON object out. Train rows from ``train.jsonl``, held-out rows from
  ``eval.jsonl``.
* ``recall``: short factual answers (capitals and continents of countries, symbols and
  atomic numbers of chemical elements), one word or number each.
* ``format``: format following: rewrite a date, a name, a number or a word list in a
  stated format.

    python bench/data/defaults_tasks.py   # prints each task's row counts and a sample
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EXTRACT = Path(__file__).resolve().parents[2] / "data" / "extract"

COUNTRIES = [
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Netherlands", "Amsterdam", "Europe"),
    ("Belgium", "Brussels", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Switzerland", "Bern", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Czechia", "Prague", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Denmark", "Copenhagen", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Iceland", "Reykjavik", "Europe"),
    ("Romania", "Bucharest", "Europe"),
    ("Bulgaria", "Sofia", "Europe"),
    ("Serbia", "Belgrade", "Europe"),
    ("Croatia", "Zagreb", "Europe"),
    ("Ukraine", "Kyiv", "Europe"),
    ("Estonia", "Tallinn", "Europe"),
    ("Latvia", "Riga", "Europe"),
    ("Lithuania", "Vilnius", "Europe"),
    ("Slovakia", "Bratislava", "Europe"),
    ("Slovenia", "Ljubljana", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("Indonesia", "Jakarta", "Asia"),
    ("Philippines", "Manila", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Asia"),
    ("Nepal", "Kathmandu", "Asia"),
    ("Pakistan", "Islamabad", "Asia"),
    ("Bangladesh", "Dhaka", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("Iraq", "Baghdad", "Asia"),
    ("Saudi Arabia", "Riyadh", "Asia"),
    ("Jordan", "Amman", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Afghanistan", "Kabul", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Uganda", "Kampala", "Africa"),
    ("Tanzania", "Dodoma", "Africa"),
    ("Zimbabwe", "Harare", "Africa"),
    ("Angola", "Luanda", "Africa"),
    ("Mali", "Bamako", "Africa"),
    ("Tunisia", "Tunis", "Africa"),
    ("Algeria", "Algiers", "Africa"),
    ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"),
    ("Guatemala", "Guatemala City", "North America"),
    ("Panama", "Panama City", "North America"),
    ("Honduras", "Tegucigalpa", "North America"),
    ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"),
    ("Colombia", "Bogota", "South America"),
    ("Venezuela", "Caracas", "South America"),
    ("Ecuador", "Quito", "South America"),
    ("Uruguay", "Montevideo", "South America"),
    ("Paraguay", "Asuncion", "South America"),
    ("Bolivia", "Sucre", "South America"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
]
ELEMENTS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn "
    "Ga Ge As Se Br Kr Rb Sr Y Zr"
).split()
ELEMENT_NAMES = (
    "hydrogen helium lithium beryllium boron carbon nitrogen oxygen fluorine neon sodium "
    "magnesium aluminium silicon phosphorus sulfur chlorine argon potassium calcium "
    "scandium titanium vanadium chromium manganese iron cobalt nickel copper zinc gallium "
    "germanium arsenic selenium bromine krypton rubidium strontium yttrium zirconium"
).split()

WORDS = (
    "apple river stone cloud tiger maple ocean pencil garden silver rocket violin meadow "
    "candle harbor falcon lemon marble quartz willow copper desert forest glacier island "
    "jungle kettle ladder mirror needle orchid pepper quill saddle tunnel umbrella valley "
    "walnut yarrow zebra anchor bridge cactus dragon ember feather"
).split()
GIVEN = "ada alan grace linus edsger barbara donald margaret niklaus frances ken dennis".split()
SURNAMES = "lovelace turing hopper torvalds dijkstra liskov knuth hamilton wirth allen".split()


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def extract_task(train_rows: int) -> tuple[list[dict], list[dict]]:
    """The shipped extraction task: its first ``train_rows`` train rows, all eval rows."""
    return read_jsonl(EXTRACT / "train.jsonl")[:train_rows], read_jsonl(EXTRACT / "eval.jsonl")


def recall_rows() -> list[dict]:
    rows = []
    for country, capital, continent in COUNTRIES:
        rows.append(chat(f"What is the capital of {country}? Answer in one word or name.", capital))
        rows.append(chat(f"On which continent is {country}? Answer with the continent.", continent))
    for number, (symbol, name) in enumerate(zip(ELEMENTS, ELEMENT_NAMES, strict=True), start=1):
        rows.append(chat(f"What is the chemical symbol of {name}? Answer with the symbol.", symbol))
        rows.append(
            chat(f"What is the atomic number of {name}? Answer with the number.", str(number))
        )
    return rows


def format_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
            rows.append(
                chat(
                    f"Rewrite the date {y:04d}-{m:02d}-{d:02d} as DD/MM/YYYY. Reply with the date only.",
                    f"{d:02d}/{m:02d}/{y:04d}",
                )
            )
        elif kind == 1:
            given, surname = rng.choice(GIVEN), rng.choice(SURNAMES)
            rows.append(
                chat(
                    f"Write the name '{given} {surname}' as SURNAME, Given. Reply with the name only.",
                    f"{surname.upper()}, {given.capitalize()}",
                )
            )
        elif kind == 2:
            words = rng.sample(WORDS, rng.randint(3, 5))
            rows.append(
                chat(
                    f"Sort these words alphabetically and join them with ' | ': {' '.join(words)}",
                    " | ".join(sorted(words)),
                )
            )
        else:
            number = rng.randint(1000, 99_999_999)
            rows.append(
                chat(
                    f"Write {number} with commas between groups of three digits. Reply with the number only.",
                    f"{number:,}",
                )
            )
    return rows


def split(rows: list[dict], held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled[held_out:], shuffled[:held_out]


def build_tasks(train_rows: int = 240, seed: int = 0) -> dict[str, tuple[list[dict], list[dict]]]:
    """``{task: (train, held_out)}`` for the three tasks, at most ``train_rows`` train rows each."""
    recall_train, recall_held = split(recall_rows(), 48, seed)
    format_train, format_held = split(format_rows(train_rows + 48, seed), 48, seed)
    return {
        "extract": extract_task(train_rows),
        "recall": (recall_train[:train_rows], recall_held),
        "format": (format_train[:train_rows], format_held),
    }


if __name__ == "__main__":
    for name, (train, held) in build_tasks().items():
        print(f"{name}: {len(train)} train, {len(held)} held out; e.g. {json.dumps(train[0])}")
