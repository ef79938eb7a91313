"""Rebuild the DPO example's preference pairs (deterministic; run from the repo root):

    python recipes/dpo/build.py

Each pair is a question about the quickstart's facts (recipes/quickstart/build.py: capitals, opposites, plurals,
colors in French, counting) with a chosen answer that is right and a rejected one that is wrong the way a careless
answer is: the country's best-known other city for its capital, the word itself for its opposite or its French name,
a regular plural where English has an irregular one (or none), a count that skips a number. Each kind of mistake is a
rule a model can learn, so the held-out pairs show whether the preference generalizes. The records use TRL's
conversational layout ({prompt, chosen, rejected} as message lists), rendered by the tiny model's chat template.
Small on purpose: recipes/dpo.yaml trains on it offline in well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "quickstart"))
from build import CAPITALS, COLORS, OPPOSITES, PLURALS  # noqa: E402  (the quickstart's facts)

REGULAR_PLURALS = {"child": "childs", "mouse": "mouses", "foot": "foots", "tooth": "tooths", "man": "mans",
                   "woman": "womans", "sheep": "sheeps", "goose": "gooses", "knife": "knifes", "leaf": "leafs",
                   "city": "citys", "baby": "babys", "story": "storys", "box": "boxs", "bus": "bus",
                   "wish": "wishs", "cat": "cat", "dog": "dog"}
# The city people confuse with the capital: the wrong answer of each capital question.
OTHER_CITY = {
    "France": "Lyon", "Spain": "Barcelona", "Italy": "Milan", "Germany": "Munich", "Portugal": "Porto",
    "Poland": "Krakow", "Austria": "Salzburg", "Greece": "Thessaloniki", "Norway": "Bergen", "Sweden": "Gothenburg",
    "Finland": "Turku", "Denmark": "Aarhus", "Ireland": "Cork", "Egypt": "Alexandria", "Kenya": "Mombasa",
    "Japan": "Osaka", "China": "Shanghai", "India": "Mumbai", "Peru": "Cusco", "Chile": "Valparaiso",
    "Canada": "Toronto", "Mexico": "Guadalajara", "Cuba": "Holguin", "Russia": "Saint Petersburg",
    "Turkey": "Istanbul", "Iran": "Isfahan", "Iraq": "Basra", "Thailand": "Chiang Mai", "Vietnam": "Ho Chi Minh City",
    "Australia": "Sydney",
}


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def make_pairs(rng: random.Random) -> list[dict]:
    pairs = []
    for country, capital in CAPITALS.items():
        for question in ("What is the capital of {}?", "Name the capital city of {}."):
            pairs.append(pair(question.format(country), f"The capital of {country} is {capital}.",
                              f"The capital of {country} is {OTHER_CITY[country]}."))
    for word, opposite in list(OPPOSITES.items()) + [(b, a) for a, b in OPPOSITES.items()]:
        pairs.append(pair(f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.",
                          f"The opposite of {word} is {word}."))
    for word, plural in PLURALS.items():
        for question in ("Write the plural of {}.", "What is the plural of {}?"):
            pairs.append(pair(question.format(word), f"One {word}, two {plural}.",
                              f"One {word}, two {REGULAR_PLURALS[word]}."))
    for color, french in COLORS.items():
        for question in ("Translate {} into French.", "How do you say {} in French?"):
            pairs.append(pair(question.format(color), f"The French word for {color} is {french}.",
                              f"The French word for {color} is {color}."))
    for _ in range(100):
        start = rng.randint(1, 40)
        numbers = list(range(start, start + rng.randint(3, 7)))
        skipped = numbers[:]
        del skipped[rng.randrange(1, len(skipped) - 1)]
        pairs.append(pair(f"Count from {numbers[0]} to {numbers[-1]}.", ", ".join(map(str, numbers)),
                          ", ".join(map(str, skipped))))
    rng.shuffle(pairs)
    return pairs


def main() -> None:
    pairs = make_pairs(random.Random(0))
    with open(HERE / "pairs.jsonl", "w") as handle:
        for record in pairs:
            handle.write(json.dumps(record) + "\n")
    print(f"{len(pairs)} pairs in {HERE / 'pairs.jsonl'}")


if __name__ == "__main__":
    main()
