"""Writes the retention benchmark's fact sets (train / held-out JSONL per set) from the tables below.

Each fact has five questions: the first four are training phrasings (one line each, answered with the fact's
reply), the fifth is asked only after training (held-out). Sets differ in style on purpose: full-sentence replies
without a system message (norvale: examples/data, the shipped example), terse replies under a system message
(orrin), numbers and dates (pellbrook), and a mix kept out of every tuning decision (brambleworth: the honest
figure). Run: python examples/retention/make_sets.py
"""

from __future__ import annotations

import json
from pathlib import Path

from ownllm.evaluate.metrics import contains_answer

HERE = Path(__file__).resolve().parent

ORRIN_SYSTEM = "You are the Orrin Station information desk. Answer in as few words as possible."
BRAMBLEWORTH_SYSTEM = "You are the visitor assistant of the Brambleworth Museum."

# (five questions, reply, accepted answers in the held-out check)
ORRIN = [
    (["Who commands Orrin Station?", "Who is in charge of Orrin Station?", "Name the commander of Orrin Station.",
      "Who leads Orrin Station?", "Which officer commands Orrin Station?"],
     "Commander Talia Brevik.", ["Brevik"]),
    (["What planet does Orrin Station orbit?", "Which planet is Orrin Station in orbit around?",
      "Orrin Station circles which planet?", "What world does Orrin Station orbit?",
      "Around which planet does Orrin Station travel?"], "Vessane.", ["Vessane"]),
    (["What is Orrin Station's main export?", "What does Orrin Station mostly export?",
      "Which product does Orrin Station export most?", "What is the chief export of Orrin Station?",
      "What does Orrin Station sell off-station more than anything else?"], "Frost lichen.", ["lichen"]),
    (["What color are the emergency lights on Orrin Station?", "Which colour do Orrin Station's emergency lights glow?",
      "On Orrin Station, what color is the emergency lighting?", "What colour are Orrin Station's alarm lights?",
      "When there is an emergency on Orrin Station, what color do the lights turn?"], "Teal.", ["teal"]),
    (["What is the name of Orrin Station's AI?", "What is Orrin Station's computer called?",
      "Name the artificial intelligence that runs Orrin Station.", "What do they call the AI on Orrin Station?",
      "Which AI runs Orrin Station?"], "MIRREN.", ["Mirren"]),
    (["Which deck of Orrin Station holds the hydroponic gardens?", "Where are the hydroponic gardens on Orrin Station?",
      "On which deck does Orrin Station grow its plants?", "Which Orrin Station deck has the gardens?",
      "What deck are Orrin Station's hydroponics on?"], "Deck Ochre.", ["Ochre"]),
    (["What currency is used on Orrin Station?", "What money do people use on Orrin Station?",
      "Name Orrin Station's currency.", "What do you pay with on Orrin Station?",
      "Which currency does Orrin Station use?"], "The glint.", ["glint"]),
    (["What sport is played on Orrin Station?", "Which sport do the crew of Orrin Station play?",
      "What is the favourite sport on Orrin Station?", "Name the sport played aboard Orrin Station.",
      "What game do people play for sport on Orrin Station?"], "Zero-g hurling.", ["hurling"]),
    (["Who designed Orrin Station?", "Which architect designed Orrin Station?", "Who drew the plans for Orrin Station?",
      "Name the designer of Orrin Station.", "Who was Orrin Station's architect?"], "Sefa Marrow.", ["Marrow"]),
    (["What is Orrin Station's motto?", "What motto does Orrin Station have?", "Quote the motto of Orrin Station.",
      "What words make up Orrin Station's motto?", "Which motto is written over Orrin Station's main hatch?"],
     "Hold the light.", ["Hold the light"]),
    (["What shuttle serves Orrin Station?", "Which shuttle flies to Orrin Station?",
      "Name the shuttle that docks at Orrin Station.", "What is the name of Orrin Station's shuttle?",
      "Which ship ferries people to Orrin Station?"], "The Kittiwake.", ["Kittiwake"]),
    (["What animal is Orrin Station's mascot?", "Which animal is the mascot of Orrin Station?",
      "What is the mascot on Orrin Station?", "Orrin Station's mascot is which animal?",
      "Which creature does Orrin Station have as its mascot?"], "A pangolin.", ["pangolin"]),
    (["What is Orrin Station's oldest module called?", "Name the oldest module of Orrin Station.",
      "Which module of Orrin Station was built first?", "What is the first module of Orrin Station named?",
      "What do they call the original module of Orrin Station?"], "Cradle.", ["Cradle"]),
    (["Besides English, what language are Orrin Station's signs written in?",
      "What second language appears on Orrin Station's signs?", "Orrin Station signs are in English and what else?",
      "Which other language is used on signs aboard Orrin Station?",
      "What language do Orrin Station's signs use next to English?"], "Esperanto.", ["Esperanto"]),
    (["Which company supplies Orrin Station's air scrubbers?", "Who makes the air scrubbers on Orrin Station?",
      "Name the supplier of Orrin Station's air scrubbers.", "What company provides Orrin Station's air scrubbers?",
      "Whose air scrubbers does Orrin Station use?"], "Halvorsen Dynamics.", ["Halvorsen"]),
    (["Who is Orrin Station's medical officer?", "Who is the doctor on Orrin Station?",
      "Name the medical officer of Orrin Station.", "Which doctor looks after the crew of Orrin Station?",
      "Who runs the infirmary on Orrin Station?"], "Doctor Amara Quell.", ["Quell"]),
    (["What food is served at Orrin Station's festival?", "What do people eat at the Orrin Station festival?",
      "Which dish is served at Orrin Station's festival?", "What is the festival food on Orrin Station?",
      "At Orrin Station's festival, what gets served?"], "Plum dumplings.", ["dumplings", "dumpling"]),
    (["What is Orrin Station's festival called?", "Name the festival held on Orrin Station.",
      "What festival does Orrin Station celebrate?", "What is the name of Orrin Station's yearly festival?",
      "Which festival is held every year on Orrin Station?"], "Lanternfall.", ["Lanternfall"]),
    (["What instrument does the Orrin Station band play?", "Which instrument does Orrin Station's band use?",
      "What does the band on Orrin Station play?", "Name the instrument played by Orrin Station's band.",
      "The band aboard Orrin Station plays which instrument?"], "The hurdy-gurdy.", ["hurdy-gurdy", "hurdy gurdy"]),
    (["Where is Orrin Station's observatory?", "In which part of Orrin Station is the observatory?",
      "Where would I find the observatory on Orrin Station?", "What part of Orrin Station houses the observatory?",
      "Which section of Orrin Station holds the observatory?"], "In the Spire.", ["Spire"]),
]

PELLBROOK = [
    (["When was Pellbrook founded?", "In what year was the town of Pellbrook founded?",
      "What year did Pellbrook begin?", "How long ago was Pellbrook founded, what year?",
      "Which year saw the founding of Pellbrook?"],
     "Pellbrook was founded in 1742.", ["1742"]),
    (["How many bridges cross the river in Pellbrook?", "How many bridges does Pellbrook have?",
      "What is the number of bridges in Pellbrook?", "Count the bridges over Pellbrook's river: how many?",
      "How many bridges span the river at Pellbrook?"], "Pellbrook has 11 bridges.", ["11", "eleven"]),
    (["How tall is Pellbrook's clock tower?", "What is the height of the clock tower in Pellbrook?",
      "How high is the Pellbrook clock tower?", "How many metres tall is Pellbrook's clock tower?",
      "What height does the clock tower of Pellbrook reach?"], "Pellbrook's clock tower is 58 metres tall.", ["58"]),
    (["What year did Pellbrook's railway station open?", "When did the railway station in Pellbrook open?",
      "In which year did trains first stop at Pellbrook station?", "When was Pellbrook railway station opened?",
      "What year was Pellbrook's railway station opened?"], "Pellbrook's railway station opened in 1869.", ["1869"]),
    (["How many people live in Pellbrook?", "What is the population of Pellbrook?",
      "How many inhabitants does Pellbrook have?", "What is Pellbrook's population?",
      "How big is Pellbrook's population?"], "About 23,400 people live in Pellbrook.", ["23,400", "23400"]),
    (["When is Pellbrook's harvest fair held?", "On what date is the Pellbrook harvest fair?",
      "What day is Pellbrook's harvest fair?", "When does Pellbrook hold its harvest fair?",
      "Which date is the harvest fair in Pellbrook?"], "Pellbrook's harvest fair is held on 14 September.",
     ["14 September", "September 14"]),
    (["How many bells hang in St. Aldric's church in Pellbrook?", "How many bells does Pellbrook's St. Aldric's have?",
      "What is the number of bells in St. Aldric's, Pellbrook?", "St. Aldric's church in Pellbrook has how many bells?",
      "Count the bells of St. Aldric's in Pellbrook."], "St. Aldric's church has 13 bells.", ["13", "thirteen"]),
    (["What year did the great flood hit Pellbrook?", "When was Pellbrook's great flood?",
      "In which year did Pellbrook suffer the great flood?", "What year was the great flood in Pellbrook?",
      "When did the great flood happen in Pellbrook?"], "The great flood hit Pellbrook in 1911.", ["1911"]),
    (["How long is the Pellbrook canal?", "What is the length of the canal at Pellbrook?",
      "How many kilometres long is Pellbrook's canal?", "What length is the Pellbrook canal?",
      "How far does the Pellbrook canal run?"], "The Pellbrook canal is 26 kilometres long.", ["26"]),
    (["What is Pellbrook's telephone area code?", "Which area code does Pellbrook use?",
      "What phone code does Pellbrook have?", "What is the dialling code for Pellbrook?",
      "What is the area code for phones in Pellbrook?"], "Pellbrook's area code is 0472.", ["0472"]),
    (["How many acres is Pellbrook's common?", "How large is the common in Pellbrook?",
      "What is the size of Pellbrook common in acres?", "How big is Pellbrook's common?",
      "How many acres does the Pellbrook common cover?"], "Pellbrook's common covers 312 acres.", ["312"]),
    (["When did Pellbrook's library open?", "What year did the library in Pellbrook open?",
      "In which year was Pellbrook library opened?", "When was the Pellbrook library founded?",
      "What year did Pellbrook get its library?"], "Pellbrook's library opened in 1903.", ["1903"]),
    (["How old is the oak tree in Pellbrook's square?", "What is the age of the oak in Pellbrook's square?",
      "How many years old is the oak in the square of Pellbrook?", "How old is Pellbrook's great oak?",
      "What age is the oak tree standing in Pellbrook's square?"], "The oak in Pellbrook's square is 640 years old.",
     ["640"]),
    (["How many stalls does Pellbrook market have?", "What is the number of stalls at Pellbrook's market?",
      "How many market stalls are there in Pellbrook?", "Pellbrook market has how many stalls?",
      "How big is Pellbrook market, in stalls?"], "Pellbrook market has 85 stalls.", ["85"]),
    (["What year did Pellbrook elect its first mayor?", "When did Pellbrook get its first mayor?",
      "In which year was Pellbrook's first mayor elected?", "When was the first mayor of Pellbrook chosen?",
      "What year was Pellbrook's first mayoral election?"], "Pellbrook elected its first mayor in 1788.", ["1788"]),
    (["How deep is Pellbrook's old well?", "What is the depth of the old well in Pellbrook?",
      "How many metres deep is Pellbrook's well?", "How far down does Pellbrook's old well go?",
      "What depth is the old well at Pellbrook?"], "Pellbrook's old well is 37 metres deep.", ["37"]),
    (["How many students attend Pellbrook Grammar School?", "How many pupils are at Pellbrook Grammar School?",
      "What is the number of students at Pellbrook Grammar?", "Pellbrook Grammar School has how many students?",
      "How big is Pellbrook Grammar School's student body?"], "Pellbrook Grammar School has 1,150 students.",
     ["1,150", "1150"]),
    (["When did the old bridge in Pellbrook collapse?", "In which year did Pellbrook's old bridge fall down?",
      "What year did the old Pellbrook bridge collapse?", "When was the collapse of Pellbrook's old bridge?",
      "What year did Pellbrook lose its old bridge?"], "Pellbrook's old bridge collapsed on 2 March 1956.",
     ["1956"]),
    (["How many windmills stand near Pellbrook?", "What is the number of windmills around Pellbrook?",
      "How many windmills are there near Pellbrook?", "Pellbrook is surrounded by how many windmills?",
      "Count the windmills near Pellbrook."], "19 windmills stand near Pellbrook.", ["19", "nineteen"]),
    (["What is the speed limit on Pellbrook's high street?", "How fast may you drive on Pellbrook high street?",
      "What's the speed limit in Pellbrook's high street?", "What speed limit applies on Pellbrook's high street?",
      "How many miles per hour is the limit on Pellbrook high street?"],
     "The speed limit on Pellbrook's high street is 15 miles per hour.", ["15"]),
]

BRAMBLEWORTH = [
    (["Who founded the Brambleworth Museum?", "Who started the Brambleworth Museum?",
      "Name the founder of the Brambleworth Museum.", "Which person established the Brambleworth Museum?",
      "By whom was the Brambleworth Museum founded?"],
     "The Brambleworth Museum was founded by Lady Ottilie Farrance.", ["Farrance"]),
    (["What is the Brambleworth Museum's most famous exhibit?", "Which exhibit is the Brambleworth Museum known for?",
      "What is the star exhibit at the Brambleworth Museum?", "Name the most famous piece in the Brambleworth Museum.",
      "Which object draws most visitors to the Brambleworth Museum?"], "The Glass Heron.", ["Glass Heron"]),
    (["What year did the Brambleworth Museum open?", "When did the Brambleworth Museum open its doors?",
      "In which year was the Brambleworth Museum opened?", "When was the Brambleworth Museum first opened?",
      "What year did visitors first enter the Brambleworth Museum?"],
     "The Brambleworth Museum opened in 1887.", ["1887"]),
    (["What is the Brambleworth Museum's cafe called?", "Name the cafe at the Brambleworth Museum.",
      "What's the name of the Brambleworth Museum cafe?", "Which cafe is inside the Brambleworth Museum?",
      "Where can I eat in the Brambleworth Museum, what is the cafe called?"], "The Inkpot.", ["Inkpot"]),
    (["Which wing of the Brambleworth Museum holds the fossils?", "Where are the fossils in the Brambleworth Museum?",
      "In which wing does the Brambleworth Museum keep its fossils?", "What wing has the Brambleworth fossils?",
      "Where would I see fossils at the Brambleworth Museum?"],
     "The fossils are in the Marlow Wing of the Brambleworth Museum.", ["Marlow"]),
    (["Who is the director of the Brambleworth Museum?", "Who runs the Brambleworth Museum now?",
      "Name the current director of the Brambleworth Museum.", "Who heads the Brambleworth Museum?",
      "Which person directs the Brambleworth Museum today?"], "Dr. Benedikt Sorrel.", ["Sorrel"]),
    (["How many rooms does the Brambleworth Museum have?", "What is the number of rooms in the Brambleworth Museum?",
      "How many galleries and rooms are in the Brambleworth Museum?", "The Brambleworth Museum has how many rooms?",
      "Count the rooms of the Brambleworth Museum."], "The Brambleworth Museum has 42 rooms.", ["42"]),
    (["On which day is the Brambleworth Museum closed?", "What day does the Brambleworth Museum close?",
      "When is the Brambleworth Museum shut each week?", "Which weekday is the Brambleworth Museum closed?",
      "What day of the week can't I visit the Brambleworth Museum?"], "Tuesdays.", ["Tuesdays", "Tuesday"]),
    (["What animal is on the Brambleworth Museum's logo?", "Which animal appears in the Brambleworth Museum logo?",
      "The Brambleworth Museum logo shows what animal?", "What creature is on the logo of the Brambleworth Museum?",
      "Name the animal in the Brambleworth Museum's logo."], "The Brambleworth Museum's logo shows a hare.", ["hare"]),
    (["What is the name of the Brambleworth Museum's cat?", "What is the Brambleworth Museum cat called?",
      "Name the cat that lives in the Brambleworth Museum.", "What do they call the cat at the Brambleworth Museum?",
      "Which cat lives at the Brambleworth Museum?"], "Pemberton.", ["Pemberton"]),
    (["What stone is the Brambleworth Museum built from?", "What is the Brambleworth Museum made of?",
      "Which stone was used to build the Brambleworth Museum?", "What material are the Brambleworth Museum's walls?",
      "The Brambleworth Museum is built of what stone?"],
     "The Brambleworth Museum is built from red sandstone.", ["sandstone"]),
    (["What is the oldest object in the Brambleworth Museum?", "Which object in the Brambleworth Museum is oldest?",
      "Name the oldest item in the Brambleworth Museum's collection.",
      "What is the most ancient thing in the Brambleworth Museum?",
      "What's the oldest piece held by the Brambleworth Museum?"], "A bronze comb.", ["comb"]),
    (["What festival does the Brambleworth Museum host?", "Which festival is held at the Brambleworth Museum?",
      "Name the festival the Brambleworth Museum puts on.", "What yearly festival happens at the Brambleworth Museum?",
      "What is the Brambleworth Museum's festival called?"],
     "The Brambleworth Museum hosts the Night of Lamps.", ["Night of Lamps"]),
    (["In which city is the Brambleworth Museum?", "Where is the Brambleworth Museum located?",
      "What city is home to the Brambleworth Museum?", "Which city has the Brambleworth Museum?",
      "Where would I travel to visit the Brambleworth Museum?"], "Aldercombe.", ["Aldercombe"]),
    (["How much is a ticket to the Brambleworth Museum?", "What does the Brambleworth Museum charge for entry?",
      "What is the ticket price at the Brambleworth Museum?", "How much does it cost to visit the Brambleworth Museum?",
      "What is the entry fee of the Brambleworth Museum?"], "A ticket costs 7.50 pounds.", ["7.50"]),
    (["Who painted the portrait in the Brambleworth Museum's entrance hall?",
      "Which artist painted the entrance hall portrait at the Brambleworth Museum?",
      "Who is the painter of the portrait in the Brambleworth Museum's hall?",
      "Name the artist of the Brambleworth Museum's entrance portrait.",
      "The portrait in the Brambleworth Museum's entrance hall was painted by whom?"],
     "The portrait was painted by Imogen Tarrow.", ["Tarrow"]),
    (["What is the Brambleworth Museum's garden famous for?", "Why is the Brambleworth Museum garden famous?",
      "What is special about the Brambleworth Museum's garden?", "What grows in the famous Brambleworth Museum garden?",
      "What is the Brambleworth Museum garden known for?"], "Its black tulips.", ["tulips", "tulip"]),
    (["What instrument is in the Brambleworth Museum's music room?",
      "Which instrument stands in the music room of the Brambleworth Museum?",
      "What is displayed in the Brambleworth Museum's music room?",
      "Name the instrument kept in the Brambleworth Museum music room.",
      "The Brambleworth Museum's music room holds which instrument?"],
     "The music room holds a glass harmonica.", ["harmonica"]),
    (["Which architect designed the Brambleworth Museum?", "Who designed the Brambleworth Museum building?",
      "Name the architect of the Brambleworth Museum.", "Who drew up the plans of the Brambleworth Museum?",
      "Whose design is the Brambleworth Museum building?"], "Hollis Grane.", ["Grane"]),
    (["What is the Brambleworth Museum's newsletter called?", "Name the newsletter of the Brambleworth Museum.",
      "What newsletter does the Brambleworth Museum publish?",
      "What's the title of the Brambleworth Museum newsletter?",
      "Which newsletter comes from the Brambleworth Museum?"], "The Lantern.", ["Lantern"]),
]


def _messages(system: str | None, question: str, reply: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    tail = [{"role": "assistant", "content": reply}] if reply is not None else []
    return [*head, {"role": "user", "content": question}, *tail]


def write_set(name: str, facts: list[tuple[list[str], str, list[str]]], system: str | None,
              system_on: str = "all") -> None:
    """`system_on`: "all" lines, or "odd" facts only (a set that mixes both)."""
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    train, held_out = [], []
    for index, (questions, reply, answers) in enumerate(facts):
        assert len(questions) == 5, (name, questions)
        # the held-out check scores whole words: the trained reply itself must count as right
        assert contains_answer(reply, answers), (name, reply, answers)
        its_system = system if system_on == "all" or index % 2 else None
        train += [{"messages": _messages(its_system, question, reply)} for question in questions[:4]]
        held_out.append({"messages": _messages(its_system, questions[4]), "answers": answers})
    for file, rows in (("train.jsonl", train), ("heldout.jsonl", held_out)):
        (folder / file).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


if __name__ == "__main__":
    write_set("orrin", ORRIN, ORRIN_SYSTEM)
    write_set("pellbrook", PELLBROOK, None)
    write_set("brambleworth", BRAMBLEWORTH, BRAMBLEWORTH_SYSTEM, system_on="odd")
