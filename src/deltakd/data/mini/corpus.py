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
