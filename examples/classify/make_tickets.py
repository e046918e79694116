"""Write tickets-train.jsonl and tickets-test.jsonl: short customer-support messages labelled billing, shipping
or technical, from templates (the test split uses its own templates, so it measures more than recall).

    python examples/classify/make_tickets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
THINGS = ["headphones", "coffee grinder", "desk lamp", "keyboard", "kettle", "garden hose", "puzzle", "charger"]
TRAIN = {
    "billing": ["I was charged twice for my {thing} order.", "Can I get a refund for the {thing}?",
                "My invoice for the {thing} shows the wrong amount.",
                "Why did my card get declined when buying a {thing}?",
                "Please cancel the subscription and stop billing me.",
                "The discount code was not applied to my {thing}.",
                "I need a VAT receipt for the {thing} I bought."],
    "shipping": ["My {thing} has not arrived yet.", "Where is my package with the {thing}?",
                 "The tracking number for my {thing} does not work.",
                 "Can you deliver the {thing} to a different address?",
                 "The {thing} box arrived crushed.", "How long does shipping to Spain take for a {thing}?",
                 "The courier left my {thing} at the wrong door."],
    "technical": ["My {thing} will not turn on.", "The app does not connect to my {thing}.",
                  "How do I reset the {thing} to factory settings?", "The {thing} makes a strange noise when I use it.",
                  "I cannot log in to my account on the website.", "The firmware update for my {thing} failed.",
                  "The {thing} stops working after a few minutes."],
}
TEST = {
    "billing": ["You took the money for the {thing} two times, please fix it.", "I want my money back for the {thing}.",
                "The price I paid for the {thing} is higher than advertised."],
    "shipping": ["It has been two weeks and still no {thing} at my door.", "Has my {thing} been sent out yet?",
                 "The parcel with my {thing} went to my neighbour."],
    "technical": ["The {thing} shows an error light and does nothing.", "After the update the {thing} keeps crashing.",
                  "Bluetooth pairing with the {thing} fails every time."],
}


def lines(templates: dict[str, list[str]], rng: random.Random, per_template: int) -> list[dict[str, str]]:
    out = [{"text": t.format(thing=thing), "label": label} for label, ts in templates.items() for t in ts
           for thing in rng.sample(THINGS, per_template)]
    unique = list({item["text"]: item for item in out}.values())
    rng.shuffle(unique)
    return unique


if __name__ == "__main__":
    rng = random.Random(0)
    for name, templates, count in (("tickets-train.jsonl", TRAIN, 3), ("tickets-test.jsonl", TEST, 3)):
        rows = lines(templates, rng, count)
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} lines")
