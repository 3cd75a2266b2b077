"""The pretraining corpus: the world's facts and arithmetic as plain prose, with no chat format.

The base models learn what the world contains (who lives where, how many legs a ``fesin`` has,
that 7 × 8 = 56) but never see a ``<|im_start|>`` turn, a question followed by its answer, or an
``Answer: N`` line. Supervised finetuning then has a real style to teach, so the teacher's
distribution shifts, which is exactly what Delta-KD transfers.
"""

from __future__ import annotations

import random

from deltakd.data.mini.tasks import VERBS, article
from deltakd.data.mini.world import FOODS, Animal, City, Person, World, make_world

_PERSON: dict[str, tuple[str, ...]] = {
    "home": ("{n} lives in {home}.", "{n} has a house in {home}.", "{n} comes from {home}."),
    "job": ("{n} is {a_job}.", "{n} works as {a_job}.", "By trade, {n} is {a_job}."),
    "colour": (
        "{n}'s favourite colour is {colour}.",
        "{n} likes the colour {colour} best.",
        "The colour {n} loves most is {colour}.",
    ),
    "food": (
        "{n}'s favourite food is {food}.",
        "{n} likes to eat {food}.",
        "{n} enjoys {food} more than any other food.",
    ),
    "age": ("{n} is {age} years old.", "{n} is aged {age}.", "{n} turned {age} this year."),
    "pet": ("{n} has {a_pet} as a pet.", "{n} keeps a pet {pet}.", "{n}'s pet is {a_pet}."),
}
_ANIMAL: dict[str, tuple[str, ...]] = {
    "colour": ("The {a} is {colour}.", "A {a} has {colour} fur.", "{A}s are {colour}."),
    "size": ("The {a} is a {size} animal.", "{A}s are {size}."),
    "food": ("The {a} eats {food}.", "{A}s feed on {food}."),
    "legs": ("The {a} has {legs} legs.", "A {a} walks on {legs} legs."),
    "home": ("The {a} lives near {home}.", "{A}s are found near {home}."),
}
_CITY: dict[str, tuple[str, ...]] = {
    "region": ("{c} is in the {region} of the land.", "{c} lies in the {region}."),
    "population": (
        "{c} has {population} thousand inhabitants.",
        "About {population} thousand people live in {c}.",
    ),
    "known_for": ("{c} is known for its {known_for}.", "{c} is famous for its {known_for}."),
}


def _person_doc(p: Person, rng: random.Random) -> str:
    f = {
        "n": p.name,
        "home": p.home,
        "a_job": f"{article(p.job)} {p.job}",
        "colour": p.colour,
        "food": p.food,
        "age": p.age,
        "a_pet": f"{article(p.pet)} {p.pet}",
        "pet": p.pet,
    }
    # A random subset in random order: each fact appears in many contexts and phrasings, which
    # is what lets a small model retrieve it for a question later.
    keys = rng.sample(sorted(_PERSON), rng.randint(3, len(_PERSON)))
    return " ".join(rng.choice(_PERSON[k]).format(**f) for k in keys)


def _animal_doc(a: Animal, rng: random.Random) -> str:
    f = {
        "a": a.name,
        "A": a.name.capitalize(),
        "colour": a.colour,
        "size": a.size,
        "food": a.food,
        "legs": a.legs,
        "home": a.home,
    }
    keys = rng.sample(sorted(_ANIMAL), rng.randint(3, len(_ANIMAL)))
    return " ".join(rng.choice(_ANIMAL[k]).format(**f) for k in keys)


def _city_doc(c: City, world: World, rng: random.Random) -> str:
    f = {"c": c.name, "region": c.region, "population": c.population, "known_for": c.known_for}
    parts = [rng.choice(_CITY[k]).format(**f) for k in rng.sample(sorted(_CITY), 3)]
    residents = [p.name for p in world.people if p.home == c.name]
    if residents and rng.random() < 0.5:
        parts.append(f"People living in {c.name} include {', '.join(residents)}.")
    return " ".join(parts)


def _arithmetic_doc(world: World, rng: random.Random) -> str:
    """Arithmetic in symbols and in prose, with the operand ranges the math task uses."""
    out = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.randrange(6)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if kind == 0:
            out.append(f"{a} + {b} = {a + b}.")
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            out.append(f"{a} - {b} = {a - b}.")
        elif kind == 2:
            a, b = rng.randint(2, 15), rng.randint(2, 12)
            out.append(f"{a} × {b} = {a * b}.")
        elif kind == 3:
            b, q = rng.randint(2, 9), rng.randint(2, 12)
            out.append(f"{b * q} ÷ {b} = {q}.")
        elif kind == 4:
            p = rng.choice(world.people).name
            f = rng.choice(FOODS)
            out.append(f"{p} had {a} {f} and got {b} more, so {p} had {a + b} {f}.")
        else:
            x = rng.choice(world.animals)
            n = rng.randint(2, 9)
            out.append(
                f"{n} {x.name}s have {n * x.legs} legs, because {n} × {x.legs} is {n * x.legs}."
            )
    return " ".join(out)


def _story_doc(world: World, rng: random.Random) -> str:
    """Sentences in present and past tense, so the verbs' forms are known before finetuning."""
    out = []
    for _ in range(rng.randint(2, 4)):
        p = rng.choice(world.people).name
        present, _, past, kind = rng.choice(VERBS)
        if kind == "food":
            obj = rng.choice(FOODS)
        elif kind == "animal":
            obj = f"the {rng.choice(world.animals).name}"
        else:
            obj = rng.choice(world.cities).name
        out.append(
            rng.choice(
                (
                    f"Today {p} {present} {obj}.",
                    f"Yesterday {p} {past} {obj}.",
                    f"Every week {p} {present} {obj}, and last week {p} {past} {obj} too.",
                )
            )
        )
    return " ".join(out)


def _meeting_doc(world: World, rng: random.Random) -> str:
    """A short story whose names and numbers recur, so predicting it needs copying from the
    context (the skill every task relies on: answers repeat names and numbers from the prompt)."""
    a, b = rng.sample(world.people, 2)
    city = rng.choice(world.cities).name
    f = rng.choice(FOODS)
    n = rng.randint(2, 40)
    return rng.choice(
        (
            f"{a.name} met {b.name} in {city}. {b.name} gave {a.name} {n} {f}, and {a.name} "
            f"thanked {b.name}. Later {a.name} and {b.name} walked back to {city} together.",
            f"In {city}, {a.name} sold {n} {f} to {b.name}. {b.name} paid for the {n} {f} "
            f"and took them home. {a.name} stayed in {city}.",
        )
    )


def make_corpus(seed: int = 0, n_docs: int = 6000, *, stream: str = "corpus") -> list[str]:
    """`n_docs` plain-text documents about the world of `seed` (no chat format).

    ``stream="heldout"`` draws fresh documents about the same facts (new phrasings, orders and
    sums) for measuring how well a model knows the world rather than its training text.
    """
    world = make_world(seed)
    rng = random.Random(f"deltakd-mini:{seed}:{stream}")
    docs: list[str] = []
    for i in range(n_docs):
        r = i % 10
        if r < 4:
            docs.append(_person_doc(world.people[(i // 10 * 4 + r) % len(world.people)], rng))
        elif r < 6:
            docs.append(_animal_doc(rng.choice(world.animals), rng))
        elif r < 7:
            docs.append(_city_doc(rng.choice(world.cities), world, rng))
        elif r < 8:
            docs.append(_arithmetic_doc(world, rng))
        elif r < 9:
            docs.append(_meeting_doc(world, rng))
        else:
            docs.append(_story_doc(world, rng))
    return docs


# World v2's worked examples in plain text: the tasks' questions with their answers, written as
# a web page or a textbook would, never in the chat format the finetuning teaches.
_PLAIN_QA: tuple[str, ...] = ("Question: {p}\nAnswer: {r}", "Q: {p}\nA: {r}", "{p}\n{r}")
_PLAIN_MATH: tuple[str, ...] = (
    "Problem: {p}\nSolution:\n{r}",
    "Exercise. {p}\n{r}",
    "{p}\n{r}",
)


def make_corpus_v2(
    seed: int = 0, n_docs: int = 9000, *, stream: str = "corpus", chat_share: float = 0.05
) -> list[str]:
    """World v2's pretraining corpus: v1's prose about the world (60 %), worked examples of
    both tasks in plain text (35 % less `chat_share`) and a small share of the same kind of
    examples in the chat format (`chat_share`), as a real base model has seen some chat.

    The base models thus already know the facts and the tasks; finetuning mostly teaches the
    chat turn, so it can stay a local shift of the base model, as in the paper's setting.
    Worked examples never use a validation or test prompt of either task.
    """
    from deltakd.data.mini.tasks import MINI_TASKS, draw_pairs, load_task
    from deltakd.data.mini.tokenizer import CHAT_TURN

    rng = random.Random(f"deltakd-mini-v2:{seed}:{stream}")
    n_prose = round(0.6 * n_docs)
    n_chat = round(chat_share * n_docs)
    n_plain = n_docs - n_prose - n_chat
    docs: list[tuple[str, str]] = [("prose", d) for d in make_corpus(seed, n_prose, stream=stream)]
    held = {
        r["messages"][0]["content"]
        for t in MINI_TASKS
        for split in ("validation", "test")
        for r in load_task(t, split, seed=seed)
    }
    # 1-2 examples per plain document, one per chat document: enough for either task alone
    per_task = 2 * n_plain + n_chat
    pairs = {
        t: iter(draw_pairs(t, seed, per_task, stream=f"v2-{stream}", exclude=held))
        for t in MINI_TASKS
    }
    for _ in range(n_plain):
        task = rng.choice(MINI_TASKS)
        forms = _PLAIN_QA if task == "instruct" else _PLAIN_MATH
        form = rng.choice(forms)
        chosen = (next(pairs[task]) for _ in range(rng.randint(1, 2)))
        shown = [form.format(p=p, r=r) for p, r in chosen]
        docs.append(("plain", "\n\n".join(shown)))
    for _ in range(n_chat):
        p, r = next(pairs[rng.choice(MINI_TASKS)])
        docs.append(("chat", CHAT_TURN.format(p=p, r=r)))
    rng.shuffle(docs)
    return [d for _, d in docs]
