"""Writes examples/retention/general-candidates.jsonl: general questions across domains with accepted answers.

`bench/retention.py --select-general` asks the base model each one (greedy, as the checks do) and keeps those it
answers right in general.jsonl: retention is then the share of the base's own right answers a tuned model keeps.
Run: python examples/retention/make_general.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUESTIONS: dict[str, list[tuple[str, list[str]]]] = {
    "arithmetic": [
        ("What is 2 plus 2?", ["4", "four"]), ("What is 3 plus 5?", ["8", "eight"]),
        ("What is 10 minus 3?", ["7", "seven"]), ("What is 6 times 7?", ["42"]), ("What is 9 times 9?", ["81"]),
        ("What is 100 divided by 4?", ["25"]), ("What is 12 plus 15?", ["27"]), ("What is 50 minus 20?", ["30"]),
        ("What is 5 times 5?", ["25"]), ("What is 8 times 8?", ["64"]), ("What is 7 plus 6?", ["13"]),
        ("What is 20 divided by 5?", ["4", "four"]), ("What is 3 times 4?", ["12", "twelve"]),
        ("What is 1 plus 1?", ["2", "two"]), ("What is 15 minus 5?", ["10", "ten"]),
        ("What is 11 times 11?", ["121"]), ("What is half of 10?", ["5", "five"]),
        ("What is double 6?", ["12", "twelve"]), ("What is 9 plus 10?", ["19"]), ("What is 1000 minus 1?", ["999"]),
        ("How many minutes are in an hour?", ["60", "sixty"]), ("How many days are in a week?", ["7", "seven"]),
        ("How many hours are in a day?", ["24"]), ("How many months are in a year?", ["12", "twelve"]),
        ("How many sides does a triangle have?", ["3", "three"]), ("How many sides does a square have?", ["4", "four"]),
        ("How many legs does a spider have?", ["8", "eight"]), ("What is the square root of 9?", ["3", "three"]),
        ("What is 10 times 10?", ["100"]), ("How many seconds are in a minute?", ["60", "sixty"]),
    ],
    "geography": [
        ("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
        ("What is the capital of Germany?", ["Berlin"]), ("What is the capital of Italy?", ["Rome"]),
        ("What is the capital of Spain?", ["Madrid"]), ("What is the capital of England?", ["London"]),
        ("What is the capital of Russia?", ["Moscow"]), ("What is the capital of China?", ["Beijing"]),
        ("What is the capital of Egypt?", ["Cairo"]), ("What is the capital of Canada?", ["Ottawa"]),
        ("What is the capital of Australia?", ["Canberra"]), ("What is the capital of Greece?", ["Athens"]),
        ("What is the capital of Portugal?", ["Lisbon"]), ("What is the capital of Ireland?", ["Dublin"]),
        ("What is the capital of Norway?", ["Oslo"]), ("What is the capital of Sweden?", ["Stockholm"]),
        ("What is the capital of the United States?", ["Washington"]),
        ("What is the capital of India?", ["New Delhi", "Delhi"]), ("What is the capital of Mexico?", ["Mexico City"]),
        ("What is the capital of Kenya?", ["Nairobi"]), ("What is the largest ocean on Earth?", ["Pacific"]),
        ("On which continent is Brazil?", ["South America"]), ("On which continent is Egypt?", ["Africa"]),
        ("What is the longest river in Africa?", ["Nile"]), ("Which country is home to the Eiffel Tower?", ["France"]),
        ("In which country are the pyramids of Giza?", ["Egypt"]), ("What is the tallest mountain in the world?",
                                                                    ["Everest"]),
        ("Which desert is the largest hot desert in the world?", ["Sahara"]),
        ("Which country has the largest population in South America?", ["Brazil"]),
        ("In which country is the city of Venice?", ["Italy"]),
    ],
    "science": [
        ("What is the chemical symbol for gold?", ["Au"]), ("What is the chemical symbol for water?", ["H2O"]),
        ("What planet is closest to the Sun?", ["Mercury"]), ("What is the largest planet in our solar system?",
                                                              ["Jupiter"]),
        ("What planet is known as the Red Planet?", ["Mars"]), ("What gas do plants take in from the air?",
                                                                ["carbon dioxide", "CO2"]),
        ("What gas do humans need to breathe?", ["oxygen"]), ("What is the freezing point of water in Celsius?",
                                                              ["0", "zero"]),
        ("What is the boiling point of water in Celsius?", ["100"]), ("What force pulls objects toward the Earth?",
                                                                      ["gravity"]),
        ("What organ pumps blood through the body?", ["heart"]), ("How many bones are in the adult human body?",
                                                                  ["206"]),
        ("What is the center of an atom called?", ["nucleus"]), ("What do bees make?", ["honey"]),
        ("What is the hardest natural substance?", ["diamond"]), ("What star is at the center of our solar system?",
                                                                  ["Sun"]),
        ("What is H2O commonly called?", ["water"]), ("What is the chemical symbol for sodium?", ["Na"]),
        ("What part of the plant makes food using sunlight?", ["leaf", "leaves"]),
        ("What is the process by which plants make food from sunlight?", ["photosynthesis"]),
        ("What is the largest organ of the human body?", ["skin"]), ("What do we call animals that eat only plants?",
                                                                     ["herbivore"]),
        ("What is frozen water called?", ["ice"]), ("Which planet has prominent rings?", ["Saturn"]),
        ("What is the natural satellite of the Earth?", ["Moon"]), ("What metal is liquid at room temperature?",
                                                                    ["mercury"]),
        ("What is the speed of light in kilometres per second, roughly?", ["300,000", "300000", "299,792", "299792"]),
        ("Which blood cells carry oxygen?", ["red"]), ("What is the main gas in the air we breathe?", ["nitrogen"]),
        ("Who proposed the theory of relativity?", ["Einstein"]),
    ],
    "language": [
        ("What is the opposite of hot?", ["cold"]), ("What is the opposite of big?", ["small", "little"]),
        ("What is the opposite of up?", ["down"]), ("What is the opposite of day?", ["night"]),
        ("What is the opposite of happy?", ["sad", "unhappy"]), ("What is the plural of mouse?", ["mice"]),
        ("What is the plural of child?", ["children"]), ("What is the past tense of go?", ["went"]),
        ("What is the past tense of eat?", ["ate"]), ("What is a synonym for happy?", ["joyful", "glad", "cheerful",
                                                                                     "content", "pleased"]),
        ("How do you say hello in Spanish?", ["hola"]), ("How do you say thank you in French?", ["merci"]),
        ("How do you say goodbye in Spanish?", ["adios", "adiós"]), ("What is the German word for yes?", ["ja"]),
        ("What language is spoken in Brazil?", ["Portuguese"]), ("What language is spoken in Mexico?", ["Spanish"]),
        ("What is the first letter of the English alphabet?", ["A"]), ("How many letters are in the English alphabet?",
                                                                       ["26"]),
        ("What is a baby cat called?", ["kitten"]), ("What is a baby dog called?", ["puppy"]),
        ("Who wrote Romeo and Juliet?", ["Shakespeare"]), ("What is the opposite of open?", ["closed", "shut"]),
        ("What word means a very large animal with a trunk?", ["elephant"]),
        ("What is the plural of tooth?", ["teeth"]), ("What is the opposite of fast?", ["slow"]),
    ],
    "everyday": [
        ("What color is the sky on a clear day?", ["blue"]), ("What color is grass?", ["green"]),
        ("What color are ripe bananas?", ["yellow"]), ("What do cows drink?", ["water"]),
        ("What do you use to cut paper?", ["scissors"]), ("What do you wear on your feet?", ["shoes", "socks"]),
        ("Which meal is eaten in the morning?", ["breakfast"]), ("What season comes after winter?", ["spring"]),
        ("What season is the hottest?", ["summer"]), ("What animal says moo?", ["cow"]),
        ("What animal barks?", ["dog"]), ("What do you call a person who flies a plane?", ["pilot"]),
        ("What do you call a doctor for teeth?", ["dentist"]), ("What is the first day of the week in the US?",
                                                                 ["Sunday"]),
        ("What fruit is used to make wine?", ["grape"]), ("What do bees live in?", ["hive"]),
        ("What do you use to write on a blackboard?", ["chalk"]), ("What is the color of snow?", ["white"]),
        ("How many wheels does a bicycle have?", ["2", "two"]), ("What do you call frozen rain?", ["hail", "sleet",
                                                                                                  "snow"]),
        ("What instrument has black and white keys?", ["piano"]), ("Where do fish live?", ["water"]),
        ("What do you call the meal eaten in the evening?", ["dinner", "supper"]),
        ("What do you use to unlock a door?", ["key"]), ("What holiday is on December 25?", ["Christmas"]),
    ],
    "instructions": [
        ("Reply in one word: what color is the sky?", ["blue"]),
        ("Answer with a number: how many legs does a cat have?", ["4"]),
        ("Reply with yes or no: is the Sun a star?", ["yes"]), ("Reply with yes or no: is ice cold?", ["yes"]),
        ("Reply with yes or no: can fish fly like birds?", ["no"]), ("In one word, what animal says meow?", ["cat"]),
        ("Answer with one word: what is the opposite of black?", ["white"]),
        ("Give just the number: what is 4 plus 4?", ["8"]), ("Name one primary color.", ["red", "blue", "yellow"]),
        ("Spell the word cat backwards.", ["tac"]), ("Write the number twelve in digits.", ["12"]),
        ("Name a fruit that is red.", ["apple", "strawberry", "cherry", "raspberry", "tomato"]),
        ("Reply in one word: what do you sleep on?", ["bed"]), ("Answer in one word: what is the capital of Italy?",
                                                                ["Rome"]),
        ("List the first three letters of the alphabet.", ["a b c", "abc", "a, b, c"]),
        ("Say only the word hello.", ["hello"]), ("Complete: one, two, three, ...", ["four"]),
        ("Name a day of the weekend.", ["Saturday", "Sunday"]), ("Reply with one word: the opposite of left.",
                                                                  ["right"]),
        ("Give a one-word answer: what do cows produce that people drink?", ["milk"]),
    ],
}

if __name__ == "__main__":
    rows = [{"question": q, "answers": a, "domain": domain} for domain, items in QUESTIONS.items() for q, a in items]
    assert len({row["question"] for row in rows}) == len(rows), "duplicate questions"
    (HERE / "general-candidates.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(len(rows), "questions:", {domain: len(items) for domain, items in QUESTIONS.items()})
