"""The miniature world's two chat tasks, with fixed train / validation / test splits.

- ``instruct`` (the ultrachat-200k analogue): questions about the knowledge base and text
  transformations (sort, reverse, numbered list, past tense, statement to question), answered
  in full sentences. Scored by ROUGE.
- ``math`` (the OpenMathReasoning analogue): multi-step arithmetic word problems whose solution
  works step by step and ends with a line ``Answer: N``. Scored by ROUGE and by exact match of
  the final answer (`extract_answer`).

Rows are regenerated from the seed on load (a few milliseconds), never shipped. Each task draws
one pool of prompts without repetition and cuts it into test, validation and train in that order,
so the splits never share a prompt and the test split does not move if the train size changes.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable
from functools import lru_cache

from deltakd.data.mini.world import FOODS, World, make_world
from deltakd.errors import DataError

MINI_TASKS: tuple[str, ...] = ("instruct", "math")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Rows per split; the test split is drawn first.
SPLIT_SIZES: dict[str, int] = {"test": 300, "validation": 200, "train": 4000}

Pair = tuple[str, str]  # (prompt, response)


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return ", ".join(items)


# ----------------------------------------------------------------------------- instruct
_PERSON_QA: dict[str, tuple[tuple[str, ...], str]] = {
    "home": (
        (
            "Where does {n} live?",
            "Which city is {n} from?",
            "In which city does {n} live?",
            "What is {n}'s home town?",
        ),
        "{n} lives in {home}.",
    ),
    "job": (
        ("What does {n} do for a living?", "What is {n}'s job?", "What work does {n} do?"),
        "{n} works as {a_job}.",
    ),
    "colour": (
        (
            "What is {n}'s favourite colour?",
            "Which colour does {n} like best?",
            "What colour does {n} love most?",
        ),
        "{n}'s favourite colour is {colour}.",
    ),
    "food": (
        (
            "What is {n}'s favourite food?",
            "What does {n} like to eat?",
            "Which food does {n} enjoy most?",
        ),
        "{n}'s favourite food is {food}.",
    ),
    "age": (
        ("How old is {n}?", "What is {n}'s age?", "What age is {n}?"),
        "{n} is {age} years old.",
    ),
    "pet": (
        (
            "What pet does {n} have?",
            "Which animal does {n} keep as a pet?",
            "What kind of pet does {n} own?",
        ),
        "{n} has {a_pet} as a pet.",
    ),
}

_ANIMAL_QA: dict[str, tuple[tuple[str, ...], str]] = {
    "colour": (("What colour is a {a}?", "What colour are {a}s?"), "The {a} is {colour}."),
    "size": (("How big is a {a}?", "What size is a {a}?"), "The {a} is a {size} animal."),
    "food": (("What do {a}s eat?", "What does a {a} eat?"), "The {a} eats {food}."),
    "legs": (
        ("How many legs does a {a} have?", "How many legs has a {a}?"),
        "The {a} has {legs} legs.",
    ),
    "home": (("Where do {a}s live?", "Where can you find {a}s?"), "The {a} lives near {home}."),
}

_CITY_QA: dict[str, tuple[tuple[str, ...], str]] = {
    "region": (
        ("Where is {c}?", "In which part of the land is {c}?"),
        "{c} is in the {region} of the land.",
    ),
    "population": (
        ("How many people live in {c}?", "What is the population of {c}?"),
        "{c} has {population} thousand inhabitants.",
    ),
    "known_for": (
        ("What is {c} known for?", "What is {c} famous for?"),
        "{c} is known for its {known_for}.",
    ),
}

# (third person present, base form, past tense) and which kind of object each verb takes.
VERBS: tuple[tuple[str, str, str, str], ...] = (
    ("eats", "eat", "ate", "food"),
    ("likes", "like", "liked", "food"),
    ("buys", "buy", "bought", "food"),
    ("sells", "sell", "sold", "food"),
    ("cooks", "cook", "cooked", "food"),
    ("carries", "carry", "carried", "food"),
    ("finds", "find", "found", "animal"),
    ("sees", "see", "saw", "animal"),
    ("feeds", "feed", "fed", "animal"),
    ("paints", "paint", "painted", "animal"),
    ("draws", "draw", "drew", "animal"),
    ("visits", "visit", "visited", "city"),
)


def _person_fields(world: World, name: str) -> dict[str, object]:
    p = world.person(name)
    return {
        "n": p.name,
        "home": p.home,
        "a_job": f"{article(p.job)} {p.job}",
        "job": p.job,
        "colour": p.colour,
        "food": p.food,
        "age": p.age,
        "a_pet": f"{article(p.pet)} {p.pet}",
        "pet": p.pet,
    }


def _qa_person(world: World, rng: random.Random) -> Pair:
    p = rng.choice(world.people)
    questions, answer = _PERSON_QA[rng.choice(sorted(_PERSON_QA))]
    f = _person_fields(world, p.name)
    return rng.choice(questions).format(**f), answer.format(**f)


def _qa_animal(world: World, rng: random.Random) -> Pair:
    a = rng.choice(world.animals)
    questions, answer = _ANIMAL_QA[rng.choice(sorted(_ANIMAL_QA))]
    f = {"a": a.name, **{k: getattr(a, k) for k in ("colour", "size", "food", "legs", "home")}}
    return rng.choice(questions).format(**f), answer.format(**f)


def _qa_city(world: World, rng: random.Random) -> Pair:
    c = rng.choice(world.cities)
    questions, answer = _CITY_QA[rng.choice(sorted(_CITY_QA))]
    f = {"c": c.name, "region": c.region, "population": c.population, "known_for": c.known_for}
    return rng.choice(questions).format(**f), answer.format(**f)


def _profile(world: World, rng: random.Random) -> Pair:
    p = rng.choice(world.people)
    f = _person_fields(world, p.name)
    q = rng.choice(("Tell me about {n}.", "Who is {n}?", "Describe {n} in a few sentences."))
    a = (
        "{n} is {a_job} who lives in {home}. {n} is {age} years old, "
        "likes the colour {colour} and keeps {a_pet} as a pet."
    )
    return q.format(**f), a.format(**f)


def _animal_facts(world: World, rng: random.Random) -> Pair:
    a = rng.choice(world.animals)
    q = rng.choice(("List three facts about the {a}.", "Give me three facts about {a}s."))
    ans = "1. The {a} is {colour}.\n2. The {a} eats {food}.\n3. The {a} has {legs} legs."
    return q.format(a=a.name), ans.format(a=a.name, colour=a.colour, food=a.food, legs=a.legs)


def _compare(world: World, rng: random.Random) -> Pair:
    if rng.random() < 0.6:
        x, y = rng.sample(world.people, 2)
        if x.age == y.age:
            return _compare(world, rng)
        old, young = (x, y) if x.age > y.age else (y, x)
        q = rng.choice(("Who is older, {x} or {y}?", "Which of {x} and {y} is older?"))
        ans = f"{old.name} is older. {old.name} is {old.age} and {young.name} is {young.age} years old."
        return q.format(x=x.name, y=y.name), ans
    x, y = rng.sample(world.cities, 2)
    if x.population == y.population:
        return _compare(world, rng)
    big, small = (x, y) if x.population > y.population else (y, x)
    q = rng.choice(("Which city is bigger, {x} or {y}?", "Is {x} or {y} the larger city?"))
    ans = (
        f"{big.name} is bigger. It has {big.population} thousand inhabitants, "
        f"while {small.name} has {small.population} thousand."
    )
    return q.format(x=x.name, y=y.name), ans


def _word_list(world: World, rng: random.Random) -> list[str]:
    pools: tuple[tuple[str, ...], ...] = (
        FOODS,
        tuple(a.name for a in world.animals),
        tuple(c.name for c in world.cities),
        tuple(p.name for p in world.people),
    )
    return rng.sample(rng.choice(pools), rng.randint(3, 6))


def _sort(world: World, rng: random.Random) -> Pair:
    words = _word_list(world, rng)
    q = rng.choice(
        ("Sort these words alphabetically: {w}.", "Put these words in alphabetical order: {w}.")
    )
    return q.format(
        w=_join(words)
    ), f"In alphabetical order: {_join(sorted(words, key=str.lower))}."


def _reverse(world: World, rng: random.Random) -> Pair:
    words = _word_list(world, rng)
    q = rng.choice(("Reverse the order of this list: {w}.", "Write this list backwards: {w}."))
    return q.format(w=_join(words)), f"In reverse order: {_join(words[::-1])}."


def _numbered(world: World, rng: random.Random) -> Pair:
    words = _word_list(world, rng)
    q = rng.choice(("Write these items as a numbered list: {w}.", "Make a numbered list of: {w}."))
    return q.format(w=_join(words)), "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1))


def _sentence(world: World, rng: random.Random) -> tuple[str, str, tuple[str, str, str, str]]:
    """A random ``NAME VERB OBJECT`` sentence as (name, object, verb forms)."""
    name = rng.choice(world.people).name
    verb = rng.choice(VERBS)
    if verb[3] == "food":
        obj = rng.choice(FOODS)
    elif verb[3] == "animal":
        obj = f"the {rng.choice(world.animals).name}"
    else:
        obj = rng.choice(world.cities).name
    return name, obj, verb


def _past_tense(world: World, rng: random.Random) -> Pair:
    name, obj, (present, _, past, _) = _sentence(world, rng)
    q = rng.choice(
        (
            "Rewrite this sentence in the past tense: {s}",
            "Put this sentence into the past tense: {s}",
        )
    )
    return q.format(s=f"{name} {present} {obj}."), f"In the past tense: {name} {past} {obj}."


def _question(world: World, rng: random.Random) -> Pair:
    name, obj, (present, base, _, _) = _sentence(world, rng)
    q = rng.choice(
        ("Turn this statement into a question: {s}", "Rewrite this statement as a question: {s}")
    )
    return q.format(s=f"{name} {present} {obj}."), f"As a question: Does {name} {base} {obj}?"


_INSTRUCT: tuple[tuple[Callable[[World, random.Random], Pair], float], ...] = (
    (_qa_person, 0.24),
    (_qa_animal, 0.07),
    (_qa_city, 0.05),
    (_profile, 0.05),
    (_animal_facts, 0.02),
    (_compare, 0.07),
    (_sort, 0.10),
    (_reverse, 0.10),
    (_numbered, 0.08),
    (_past_tense, 0.11),
    (_question, 0.11),
)


# ----------------------------------------------------------------------------- math
def _m_add_sub(world: World, rng: random.Random) -> tuple[str, str, int]:
    p, q = rng.sample(world.people, 2)
    f = rng.choice(FOODS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    s1 = a + b
    c = rng.randint(1, s1 - 1)
    s2 = s1 - c
    prob = (
        f"{p.name} has {a} {f}. {p.name} buys {b} more {f} and then gives {c} to {q.name}. "
        f"How many {f} does {p.name} have now?"
    )
    sol = (
        f"{p.name} starts with {a} {f}.\n"
        f"After buying {b} more, {p.name} has {a} + {b} = {s1}.\n"
        f"After giving {c} to {q.name}, {p.name} has {s1} - {c} = {s2}.\n"
        f"Answer: {s2}"
    )
    return prob, sol, s2


def _m_baskets(world: World, rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(world.people)
    f = rng.choice(FOODS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 30)
    s1 = a * b
    s2 = s1 + c
    prob = (
        f"{p.name} fills {a} baskets with {b} {f} each and already had {c} {f} at home. "
        f"How many {f} does {p.name} have in total?"
    )
    sol = (
        f"The baskets hold {a} × {b} = {s1} {f}.\n"
        f"With the {c} at home, {p.name} has {s1} + {c} = {s2}.\n"
        f"Answer: {s2}"
    )
    return prob, sol, s2


def _m_change(world: World, rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(world.people)
    city = rng.choice(world.cities).name
    f = rng.choice(FOODS)
    a, b = rng.randint(2, 15), rng.randint(2, 9)
    s1 = a * b
    c = (s1 // 10 + 1 + rng.randint(0, 4)) * 10
    s2 = c - s1
    prob = (
        f"In {city}, one basket of {f} costs {a} coins. {p.name} buys {b} baskets and pays "
        f"with {c} coins. How much change does {p.name} get?"
    )
    sol = (
        f"The baskets cost {b} × {a} = {s1} coins.\n"
        f"The change is {c} - {s1} = {s2} coins.\n"
        f"Answer: {s2}"
    )
    return prob, sol, s2


def _m_share(world: World, rng: random.Random) -> tuple[str, str, int]:
    p = rng.choice(world.people)
    f = rng.choice(FOODS)
    b, s1 = rng.randint(2, 9), rng.randint(2, 12)
    a = b * s1
    c = rng.randint(1, s1)
    s2 = s1 - c
    prob = (
        f"{p.name} has {a} {f} and shares them equally among {b} friends. Each friend then "
        f"eats {c} of them. How many {f} does each friend have left?"
    )
    sol = (
        f"Each friend gets {a} ÷ {b} = {s1} {f}.\n"
        f"After eating {c}, each friend has {s1} - {c} = {s2}.\n"
        f"Answer: {s2}"
    )
    return prob, sol, s2


def _m_legs(world: World, rng: random.Random) -> tuple[str, str, int]:
    x, y = rng.sample(world.animals, 2)
    city = rng.choice(world.cities).name
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    s1, s2 = a * x.legs, b * y.legs
    s3 = s1 + s2
    prob = (
        f"A farm near {city} keeps {a} {x.name}s with {x.legs} legs each and {b} {y.name}s "
        f"with {y.legs} legs each. How many legs are there on the farm?"
    )
    sol = (
        f"The {x.name}s have {a} × {x.legs} = {s1} legs.\n"
        f"The {y.name}s have {b} × {y.legs} = {s2} legs.\n"
        f"Together there are {s1} + {s2} = {s3} legs.\n"
        f"Answer: {s3}"
    )
    return prob, sol, s3


def _m_ages(world: World, rng: random.Random) -> tuple[str, str, int]:
    p, q = rng.sample(world.people, 2)
    k = rng.randint(2, 15)
    s1 = p.age + q.age
    s2 = k * 2
    s3 = s1 + s2
    prob = (
        f"{p.name} is {p.age} years old and {q.name} is {q.age} years old. "
        f"What will their ages add up to in {k} years?"
    )
    sol = (
        f"Now their ages add up to {p.age} + {q.age} = {s1}.\n"
        f"In {k} years each of them is {k} years older, which adds {k} × 2 = {s2}.\n"
        f"So the total will be {s1} + {s2} = {s3}.\n"
        f"Answer: {s3}"
    )
    return prob, sol, s3


_MATH: tuple[tuple[Callable[[World, random.Random], tuple[str, str, int]], float], ...] = (
    (_m_add_sub, 0.2),
    (_m_baskets, 0.2),
    (_m_change, 0.15),
    (_m_share, 0.15),
    (_m_legs, 0.15),
    (_m_ages, 0.15),
)

_ANSWER_RE = re.compile(r"Answer:\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def extract_answer(text: str) -> str | None:
    """The final answer of a math solution: the number after the last ``Answer:``, or None.

    Thousands separators are dropped and integers are normalised (``"042"`` → ``"42"``) so that
    exact match compares values, not spellings.
    """
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    raw = matches[-1].replace(",", "")
    try:
        return str(int(raw)) if "." not in raw else raw
    except ValueError:
        return None


# ----------------------------------------------------------------------------- splits
def _row(prompt: str, response: str, answer: str | None) -> dict:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ],
        "answer": answer,
    }


@lru_cache(maxsize=8)
def _pool(task: str, seed: int) -> tuple[dict, ...]:
    world = make_world(seed)
    rng = random.Random(f"deltakd-mini:{seed}:{task}")
    total = sum(SPLIT_SIZES.values())
    seen: set[str] = set()
    rows: list[dict] = []
    if task == "instruct":
        gens, weights = zip(*_INSTRUCT)
    else:
        gens, weights = zip(*_MATH)
    while len(rows) < total:
        gen = rng.choices(gens, weights=weights)[0]
        out = gen(world, rng)
        prompt, response = out[0], out[1]
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(_row(prompt, response, str(out[2]) if task == "math" else None))
    return tuple(rows)


def load_task(task: str, split: str, *, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Rows of a mini-world task split.

    Each row is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}],
    "answer": str | None}`` where ``answer`` is the final number for ``math`` and None for
    ``instruct``. Same seed → identical rows; splits never share a prompt.
    """
    if task not in MINI_TASKS:
        raise DataError(
            f"unknown mini-world task {task!r}; use one of {', '.join(MINI_TASKS)} "
            "(e.g. dataset 'mini:instruct')"
        )
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for mini:{task}; use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 or None, got {limit}; pass a non-negative count")
    pool = _pool(task, int(seed))
    start = 0
    for name in ("test", "validation", "train"):
        if name == split:
            break
        start += SPLIT_SIZES[name]
    rows = pool[start : start + SPLIT_SIZES[split]]
    if limit is not None:
        rows = rows[:limit]
    return copy.deepcopy(list(rows))


def draw_pairs(
    task: str, seed: int, n: int, *, stream: str, exclude: set[str] | None = None
) -> list[tuple[str, str]]:
    """`n` fresh (prompt, response) pairs of `task` from the generators behind its splits, on
    their own random stream (world v2's pretraining corpus writes them out as plain text).

    Prompts in `exclude` are never drawn; the same pair may come more than once, as text on
    the web repeats. The splits themselves (`load_task`) do not depend on this."""
    world = make_world(seed)
    rng = random.Random(f"deltakd-mini:{seed}:{task}:{stream}")
    gens, weights = zip(*(_INSTRUCT if task == "instruct" else _MATH))
    out: list[tuple[str, str]] = []
    while len(out) < n:
        prompt, response = rng.choices(gens, weights=weights)[0](world, rng)[:2]
        if exclude and prompt in exclude:
            continue
        out.append((prompt, response))
    return out
