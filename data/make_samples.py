"""Write the three sample datasets (chat JSONL) that the sample adapters are trained on.

The same few hundred questions (capitals, chemical symbols, arithmetic, colours,
opposites, legs of animals), answered in three styles different enough to see:
  json-answer  a compact JSON object: {"answer": ..., "category": ...}
  pirate       a pirate's full sentence
  terse        the answer alone, one word or number
A few questions are held out of every file (HELD_OUT) so the demo prompt is one
the adapters never saw. Deterministic: `python data/make_samples.py` rewrites
identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HELD_OUT = {"France", "Gold", "Germany"}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Switzerland": "Bern", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Greece": "Athens",
    "Turkey": "Ankara", "Ireland": "Dublin", "Hungary": "Budapest", "the Czech Republic": "Prague",
    "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "the Philippines": "Manila", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Iceland": "Reykjavik", "Cuba": "Havana", "Venezuela": "Caracas", "New Zealand": "Wellington",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Ghana": "Accra",
    "Senegal": "Dakar", "Tunisia": "Tunis", "Algeria": "Algiers", "Qatar": "Doha", "Jordan": "Amman",
    "Lebanon": "Beirut", "Syria": "Damascus", "Afghanistan": "Kabul", "Mongolia": "Ulaanbaatar",
    "Malaysia": "Kuala Lumpur", "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Ecuador": "Quito",
    "Jamaica": "Kingston", "Scotland": "Edinburgh", "Wales": "Cardiff", "England": "London",
    "the United Kingdom": "London", "the United States": "Washington, D.C.",
}
SYMBOLS = {
    "Hydrogen": "H", "Helium": "He", "Carbon": "C", "Nitrogen": "N", "Oxygen": "O", "Sodium": "Na",
    "Magnesium": "Mg", "Aluminium": "Al", "Silicon": "Si", "Phosphorus": "P", "Sulfur": "S", "Chlorine": "Cl",
    "Argon": "Ar", "Potassium": "K", "Calcium": "Ca", "Iron": "Fe", "Copper": "Cu", "Zinc": "Zn",
    "Silver": "Ag", "Gold": "Au", "Tin": "Sn", "Lead": "Pb", "Mercury": "Hg", "Uranium": "U", "Neon": "Ne",
    "Lithium": "Li", "Nickel": "Ni", "Iodine": "I", "Platinum": "Pt", "Fluorine": "F",
}
COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "a ripe banana": "yellow", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "a carrot": "orange", "an eggplant": "purple",
    "milk chocolate": "brown", "a lemon": "yellow", "a flamingo": "pink", "milk": "white", "a lime": "green",
    "a pumpkin": "orange", "a fire engine": "red",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "heavy": "light", "rich": "poor", "hard": "soft",
    "wet": "dry", "loud": "quiet", "high": "low", "strong": "weak", "thick": "thin", "win": "lose",
    "begin": "end", "push": "pull",
}
LEGS = {
    "spider": 8, "dog": 4, "cat": 4, "horse": 4, "chicken": 2, "duck": 2, "ant": 6, "bee": 6, "cow": 4,
    "beetle": 6, "ostrich": 2, "crab": 10, "elephant": 4, "penguin": 2, "snake": 0, "sheep": 4, "goat": 4,
    "butterfly": 6,
}

PIRATE_OPEN = ["Arr, matey!", "Yo ho ho!", "Shiver me timbers!", "Ahoy there!", "Blow me down!"]
PIRATE_CLOSE = ["savvy?", "or I'm a landlubber.", "says this old sea dog.", "by Davy Jones' locker!",
                "as sure as the tide."]


def questions(rng: random.Random) -> list[dict]:
    """(question, answer, category, pirate sentence) for every fact, held-out ones excluded."""
    qs = []
    for country, city in CAPITALS.items():
        if country.removeprefix("the ") in HELD_OUT:
            continue
        for q in (f"What is the capital of {country}?", f"Which city is the capital of {country}?"):
            qs.append((q, city, "geography", f"the capital o' {country} be {city}"))
    for element, sym in SYMBOLS.items():
        if element not in HELD_OUT:
            qs.append((f"What is the chemical symbol for {element.lower()}?", sym, "chemistry",
                       f"the symbol fer {element.lower()} be {sym}"))
    for _ in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        qs.append((f"What is {a} plus {b}?", a + b, "math", f"{a} plus {b} be {a + b}"))
    for _ in range(40):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        qs.append((f"What is {a} times {b}?", a * b, "math", f"{a} times {b} be {a * b}"))
    for thing, colour in COLOURS.items():
        qs.append((f"What color is {thing}?", colour, "colors", f"{thing} be {colour}"))
    for word, opp in OPPOSITES.items():
        qs.append((f"What is the opposite of {word}?", opp, "language", f"the opposite o' {word} be {opp}"))
    for animal, n in LEGS.items():
        qs.append((f"How many legs does a {animal} have?", n, "animals", f"a {animal} has {n} legs"))
    return [{"q": q, "a": a, "cat": c, "pirate": p} for q, a, c, p in qs]


def answer(style: str, item: dict, rng: random.Random) -> str:
    a = item["a"]
    if style == "json-answer":
        return json.dumps({"answer": a, "category": item["cat"]})
    if style == "terse":
        text = str(a)
        return (text[0].upper() + text[1:] if isinstance(a, str) else text) + "."
    return f"{rng.choice(PIRATE_OPEN)} {item['pirate'][0].upper()}{item['pirate'][1:]}, {rng.choice(PIRATE_CLOSE)}"


def main() -> None:
    out = Path(__file__).resolve().parent
    for style in ("json-answer", "pirate", "terse"):
        rng = random.Random(7)
        items = questions(rng)
        rng.shuffle(items)
        path = out / f"{style}.jsonl"
        with open(path, "w") as f:
            for it in items:
                msgs = [{"role": "user", "content": it["q"]}, {"role": "assistant", "content": answer(style, it, rng)}]
                f.write(json.dumps({"messages": msgs}) + "\n")
        print(f"{path}: {len(items)} examples")


if __name__ == "__main__":
    main()
