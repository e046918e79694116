"""Write tools-train.jsonl and tools-heldout.jsonl: OpenAI's fine-tuning format for function calling, one tool.

    python examples/data/make_tool_data.py

The tool is `get_weather(city, unit)`. Training lines ask for the weather in 36 cities, in 12 phrasings, with the
unit asked for or left to the default (celsius); some go on with the tool's result and a reply that uses it, and
26 are questions that need no tool, answered in prose (so that `tool_choice: "auto"` keeps answering those).
The held-out set uses other cities and phrasings, never seen in training. Seeded: the same files every run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city's name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}

TRAIN_CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Warsaw", "Dublin", "Oslo",
                "Stockholm", "Helsinki", "Athens", "Budapest", "Brussels", "Amsterdam", "Copenhagen", "Zurich",
                "Tokyo", "Seoul", "Beijing", "Delhi", "Cairo", "Nairobi", "Lagos", "Sydney", "Toronto", "Chicago",
                "Boston", "Denver", "Lima", "Santiago", "Bogota", "Mexico City", "Istanbul", "Bangkok"]
HELDOUT_CITIES = ["London", "Moscow", "Mumbai", "Jakarta", "Manila", "Hanoi", "Dubai", "Casablanca", "Accra",
                  "Melbourne", "Auckland", "Vancouver", "Seattle", "Miami", "Havana", "Quito", "Caracas",
                  "Montevideo", "Reykjavik", "Edinburgh"]
TRAIN_ASKS = ["What is the weather in {city}?", "How is the weather in {city} right now?",
              "Is it cold in {city} today?", "Tell me the current weather in {city}.",
              "What's it like outside in {city}?", "Weather for {city}, please.",
              "Do I need a jacket in {city} today?", "Check the weather in {city} for me.",
              "How warm is it in {city}?", "Can you look up the weather in {city}?",
              "I'm flying to {city} tonight. What's the weather there?", "Current conditions in {city}?"]
HELDOUT_ASKS = ["Could you tell me what the weather is doing in {city}?", "Is it raining in {city} at the moment?",
                "What temperature is it in {city} now?", "Give me the weather report for {city}."]
UNITS = {"celsius": ["in celsius", "in degrees Celsius", "in °C"],
         "fahrenheit": ["in fahrenheit", "in degrees Fahrenheit", "in °F"]}
CONDITIONS = ["sunny", "cloudy", "raining", "windy", "foggy", "snowing", "clear"]
NO_TOOL = [("What is the capital of Italy?", "The capital of Italy is Rome."),
           ("How many days are in a leap year?", "A leap year has 366 days."),
           ("Say hello in French.", "Bonjour!"),
           ("What is 7 times 8?", "7 times 8 is 56."),
           ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice."),
           ("What colour is grass?", "Grass is green."),
           ("Name a fruit that is yellow.", "A banana is yellow."),
           ("What do bees make?", "Bees make honey."),
           ("How many legs does a spider have?", "A spider has eight legs."),
           ("What is the opposite of early?", "The opposite of early is late."),
           ("What is a tornado?", "A tornado is a violently rotating column of air that touches the ground."),
           ("Why is it colder in winter?", "In winter the sun is lower in the sky, so its light is weaker."),
           ("What is the largest desert in Africa?", "The Sahara is the largest desert in Africa."),
           ("How many hours are in a day?", "There are 24 hours in a day."),
           ("Translate 'thank you' into Spanish.", "Gracias."),
           ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius."),
           ("Who composed the Moonlight Sonata?", "Ludwig van Beethoven composed the Moonlight Sonata."),
           ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
           ("Write a greeting for a birthday card.", "Happy birthday! Wishing you a wonderful year ahead."),
           ("What is 10 minus 3?", "10 minus 3 is 7."),
           ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
           ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
           ("What causes rain?", "Rain falls when water droplets in clouds grow heavy enough to fall."),
           ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
           ("What language is spoken in Argentina?", "Spanish is spoken in Argentina."),
           ("How many continents are there?", "There are seven continents.")]
HELDOUT_NO_TOOL = [("What is the capital of Spain?", "The capital of Spain is Madrid."),
                   ("How many months are in a year?", "There are twelve months in a year."),
                   ("What animal says moo?", "A cow says moo."),
                   ("What is 3 plus 4?", "3 plus 4 is 7.")]


def ask(rng: random.Random, template: str, city: str) -> tuple[str, str]:
    """A question and the unit the call must carry: named in the question, or the default (celsius)."""
    question = template.format(city=city)
    if rng.random() < 0.5:
        unit = rng.choice(["celsius", "fahrenheit"])
        question = f"{question.rstrip('?.')} {rng.choice(UNITS[unit])}?"
        return question, unit
    return question, "celsius"


def call_line(question: str, city: str, unit: str, call_id: str, result: tuple[int, str] | None
              ) -> dict[str, object]:
    call = {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": unit})}}
    messages: list[dict[str, object]] = [{"role": "user", "content": question},
                                         {"role": "assistant", "content": None, "tool_calls": [call]}]
    if result is not None:
        degrees, condition = result
        symbol = "°C" if unit == "celsius" else "°F"
        messages += [{"role": "tool", "tool_call_id": call_id,
                      "content": json.dumps({"temperature": degrees, "unit": unit, "conditions": condition})},
                     {"role": "assistant", "content": f"It is {degrees}{symbol} and {condition} in {city}."}]
    return {"messages": messages, "tools": [WEATHER], "parallel_tool_calls": False}


def prose_line(question: str, answer: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "tools": [WEATHER], "parallel_tool_calls": False}


def main() -> None:
    rng = random.Random(0)
    train = []
    for index, city in enumerate(TRAIN_CITIES):
        for template in rng.sample(TRAIN_ASKS, 2):
            question, unit = ask(rng, template, city)
            degrees = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
            result = (degrees, rng.choice(CONDITIONS)) if rng.random() < 0.3 else None
            train.append(call_line(question, city, unit, f"call_{index:03d}{len(train):03d}", result))
    train += [prose_line(q, a) for q, a in NO_TOOL]
    rng.shuffle(train)
    heldout = []
    for index, city in enumerate(HELDOUT_CITIES):
        question, unit = ask(rng, HELDOUT_ASKS[index % len(HELDOUT_ASKS)], city)
        heldout.append(call_line(question, city, unit, f"call_h{index:03d}", None))
    heldout += [prose_line(q, a) for q, a in HELDOUT_NO_TOOL]
    for name, lines in (("tools-train.jsonl", train), ("tools-heldout.jsonl", heldout)):
        (HERE / name).write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
                                 encoding="utf-8")
        print(f"{name}: {len(lines)} lines")


if __name__ == "__main__":
    main()
