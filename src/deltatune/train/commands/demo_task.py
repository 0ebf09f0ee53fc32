"""The bundled demo task: turn a sentence about a person into one line of JSON.

    "At 41, Maya Lindqvist moved to Porto to work as a nurse."
      -> {"name": "Maya Lindqvist", "age": 41, "city": "Porto", "job": "nurse"}

A 135M instruct model knows what JSON is but does not reliably produce this exact shape (key order,
types, no prose, no code fences), so its exact-match is low; a small LoRA learns the format in a couple
of minutes on a CPU. Names in the held-out split never occur in training, so the score measures the
format, not memorised people.

Regenerate the bundled files with `python -m deltatune.train.demo_task` (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You turn text into JSON."
INSTRUCTION = "Extract name, age, city and job as JSON:"

FIRST = (
    "Maya Liam Sofia Noah Ava Ethan Zoe Lucas Mia Omar Lena Arjun Chloe Mateo Nina Hugo Aisha Felix "
    "Iris Kenji Clara Diego Elena Tomas Yara Ivan Priya Oscar Hana Leo Amara Jonas Rosa Emil Sara "
    "Dmitri Lucia Ravi Freya Pablo Mei Samuel Ingrid Kofi Alma Victor Nadia Bruno Ayla Theo"
).split()
LAST = (
    "Lindqvist Okafor Moreau Tanaka Novak Silva Kowalski Haddad Jensen Rossi Petrov Nguyen Fischer "
    "Garcia Murphy Sato Larsen Dubois Mensah Costa Weber Ortiz Ivanova Kaur Becker Romano Berg "
    "Alvarez Nakamura Schmidt Horvat Diallo Lopez Brennan Yilmaz Moretti Hansen Castillo Park "
    "Andersen"
).split()
CITIES = (
    "Porto Lyon Osaka Denver Krakow Nairobi Lima Oslo Tallinn Seville Austin Hanoi Dublin Quito "
    "Leeds Graz Busan Perth Tunis Bergen Bologna Accra Montreal Valencia Kyoto Utrecht Adelaide "
    "Cusco Riga Malmo"
).split()
JOBS = (
    "nurse teacher baker pilot chemist plumber architect florist lawyer welder librarian carpenter "
    "dentist journalist mechanic pharmacist translator electrician veterinarian photographer"
).split()

TEMPLATES = (
    "{name} is {age} years old, lives in {city} and works as a {job}.",
    "At {age}, {name} moved to {city} to work as a {job}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "{city} has a new {job}: {name}, aged {age}.",
    "The {job} {name} ({age}) is based in {city}.",
    "{name}, {age}, {job}, {city}.",
    "Our {job} in {city} is {name}; {name_first} turned {age} this year.",
    "Born {age} years ago, {name} now works in {city} as a {job}.",
    "{name} - {job} - age {age} - lives in {city}",
    "Hired in {city}: {job} {name}, who is {age}.",
)


def make_example(rng: random.Random, first_names: list[str]) -> dict:
    """One row in the `messages` format."""
    first, last = rng.choice(first_names), rng.choice(LAST)
    person = {
        "name": f"{first} {last}",
        "age": rng.randint(19, 78),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    text = rng.choice(TEMPLATES).format(name_first=first, **person)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{INSTRUCTION}\n{text}"},
            {"role": "assistant", "content": json.dumps(person)},
        ]
    }


def make_splits(n_train: int = 1200, n_eval: int = 200, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Deterministic train / held-out rows; held-out first names never appear in training."""
    rng = random.Random(seed)
    names = list(FIRST)
    rng.shuffle(names)
    held_out_names, train_names = names[:10], names[10:]
    return (
        [make_example(rng, train_names) for _ in range(n_train)],
        [make_example(rng, held_out_names) for _ in range(n_eval)],
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    data_dir = Path(__file__).resolve().parents[3] / "data"  # src/deltatune/data
    train, held_out = make_splits()
    write_jsonl(data_dir / "demo_train.jsonl", train)
    write_jsonl(data_dir / "demo_eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} held-out rows to {data_dir}")
