"""The miniature world's knowledge base: invented people, cities and animals with attributes.

Everything is drawn from `random.Random` streams keyed by the seed, never from the global
RNG, so the same seed gives the same world on every machine and Python version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

# Syllables for invented names. Short, pronounceable pieces keep names a few BPE tokens long.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "l", "r", "s", "k", "m")

COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink",
    "brown", "silver",
)  # fmt: skip
FOODS = (
    "apples", "bread", "rice", "fish", "honey", "plums", "cheese", "beans", "soup", "nuts",
    "carrots", "berries", "figs", "noodles", "pears", "eggs",
)  # fmt: skip
JOBS = (
    "baker", "farmer", "teacher", "painter", "doctor", "sailor", "miner", "singer", "builder",
    "tailor", "potter", "weaver",
)  # fmt: skip
SIZES = ("tiny", "small", "large", "huge")
REGIONS = ("north", "south", "east", "west", "centre")
LEGS = (2, 4, 6, 8)

N_PEOPLE = 48
N_CITIES = 16
N_ANIMALS = 16


@dataclass(frozen=True)
class City:
    name: str
    region: str
    population: int  # thousands of inhabitants
    known_for: str  # a food


@dataclass(frozen=True)
class Animal:
    name: str  # an invented species; plural is name + "s"
    colour: str
    size: str
    food: str
    legs: int
    home: str  # a city name


@dataclass(frozen=True)
class Person:
    name: str
    home: str  # a city name
    job: str
    colour: str
    food: str
    age: int
    pet: str  # an animal species name


@dataclass(frozen=True)
class World:
    seed: int
    cities: tuple[City, ...]
    animals: tuple[Animal, ...]
    people: tuple[Person, ...]

    def city(self, name: str) -> City:
        return next(c for c in self.cities if c.name == name)

    def animal(self, name: str) -> Animal:
        return next(a for a in self.animals if a.name == name)

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


def _names(
    rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str]
) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))
        word += rng.choice(_CODAS)
        if 4 <= len(word) <= 10 and word not in taken:
            taken.add(word)
            out.append(word)
    return out


@lru_cache(maxsize=8)
def make_world(seed: int = 0) -> World:
    """The knowledge base for `seed` (cached: it is immutable)."""
    rng = random.Random(f"deltakd-mini:{seed}:world")
    taken: set[str] = set()
    city_names = [n.capitalize() for n in _names(rng, N_CITIES, (2, 3), taken)]
    animal_names = _names(rng, N_ANIMALS, (2, 2), taken)  # lower-case common nouns
    person_names = [n.capitalize() for n in _names(rng, N_PEOPLE, (2, 3), taken)]

    cities = tuple(
        City(
            name=n,
            region=rng.choice(REGIONS),
            population=rng.randint(2, 95),
            known_for=rng.choice(FOODS),
        )
        for n in city_names
    )
    animals = tuple(
        Animal(
            name=n,
            colour=rng.choice(COLOURS),
            size=rng.choice(SIZES),
            food=rng.choice(FOODS),
            legs=rng.choice(LEGS),
            home=rng.choice(city_names),
        )
        for n in animal_names
    )
    people = tuple(
        Person(
            name=n,
            home=rng.choice(city_names),
            job=rng.choice(JOBS),
            colour=rng.choice(COLOURS),
            food=rng.choice(FOODS),
            age=rng.randint(18, 80),
            pet=rng.choice(animal_names),
        )
        for n in person_names
    )
    return World(seed=seed, cities=cities, animals=animals, people=people)
