"""Builds data/chat/train.jsonl and data/chat/heldout.jsonl: small synthetic conversations (a
`messages` column, smol-smoltalk's layout) for the fine-tune example in docs/chat.md. Every fact
is generated here from the tables below (arithmetic, unit conversions, word facts, capitals), so the
files derive from nothing else and carry this repo's licence. Deterministic:
`python data/chat/build.py` rewrites the same bytes."""
import json
import os
import random

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens",
            "Chile": "Santiago", "Poland": "Warsaw", "Ireland": "Dublin", "Portugal": "Lisbon",
            "Austria": "Vienna", "Cuba": "Havana", "India": "New Delhi", "Mexico": "Mexico City",
            "Germany": "Berlin", "Sweden": "Stockholm", "Finland": "Helsinki", "Vietnam": "Hanoi"}
WORDS = ["apple", "river", "planet", "garden", "window", "silver", "market", "thunder", "pencil",
         "castle", "orange", "bridge", "forest", "candle", "rocket", "butter", "dragon", "island"]
SYSTEMS = [None, None, "You are a concise assistant.", "Answer in one short sentence."]


def arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    name = {"+": "plus", "-": "minus", "*": "times"}[op]
    return (rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {name} {b}.", f"{a} {op} {b} = ?"]),
            f"{a} {op} {b} = {value}.")


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return (rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
            f"The capital of {country} is {CAPITALS[country]}.")


def spelling(rng):
    word = rng.choice(WORDS)
    return (rng.choice([f"How many letters are in the word \"{word}\"?", f"Count the letters of \"{word}\"."]),
            f"The word \"{word}\" has {len(word)} letters: {', '.join(word)}.")


def reverse(rng):
    word = rng.choice(WORDS)
    return f"Spell \"{word}\" backwards.", f"\"{word}\" backwards is \"{word[::-1]}\"."


def units(rng):
    km = rng.randint(1, 50)
    return f"How many metres are in {km} kilometres?", f"{km} kilometres are {km * 1000:,} metres."


KINDS = [arithmetic, capital, spelling, reverse, units]


def conversation(rng):
    messages = []
    system = rng.choice(SYSTEMS)
    if system:
        messages.append({"role": "system", "content": system})
    for _ in range(rng.choice([1, 1, 2, 3])):
        question, answer = rng.choice(KINDS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main():
    rng = random.Random(32)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, n in (("train.jsonl", 2000), ("heldout.jsonl", 200)):
        with open(os.path.join(here, name), "w") as f:
            for _ in range(n):
                f.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
