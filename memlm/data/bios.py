"""bios: synthetic biographies of people with unique names, deterministic by seed, 1k to 1M people.

In the spirit of the synthetic biography data of Allen-Zhu & Li ("Physics of Language Models 3.1") used by
ExplicitLM: each person has six attributes, the training text states them with several paraphrases in a
random sentence order, and questions use templates the training text never contains.

Names are unique by construction, not by rejection: a name is ``First M. Surname`` with surnames built
from syllables, and people get distinct codes from a seeded sample of the index space ``first x middle x
surname`` (8M+ names). Generation runs in chunks of :data:`CHUNK` people, each from its own seeded random
state, so worker processes produce the same bytes as one process and memory stays bounded.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlm.data.benchmark import (
    BenchmarkConfig,
    Entity,
    Templates,
    open_benchmark,
    render_entities,
    split_of,
    split_ranks,
    templates_json,
    write_parts,
)

CHUNK = 10_000  # people per chunk; part of the output's definition (changing it changes the bytes)


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    """Split a word list written as prose; ``_`` stands for a space inside one item."""
    return tuple(w.strip().replace("_", " ") for w in text.split(sep) if w.strip())


FIRST_NAMES = _words(
    """Aaron Abigail Ada Adam Adrian Aisha Alan Albert Alice Amara Amelia Ana Andre Andrew Angela Anika Anna
    Anton Arjun Arthur Astrid Aurora Ava Beatrice Ben Bianca Boris Brian Bruno Caleb Camila Carl Carmen Caroline
    Cecilia Chen Chloe Clara Colin Conrad Daisy Daniel Daria David Diana Diego Dmitri Dora Dylan Edgar Edith
    Eduardo Elena Eli Elias Elif Eliza Ella Emil Emma Enzo Eric Erin Esther Ethan Eva Evelyn Felix Fiona Flora
    Frank Freya Gabriel Gemma George Gloria Grace Greta Hana Hannah Harper Hassan Hector Helen Henry Hugo Ian
    Ida Igor Ines Irene Iris Isaac Isabel Ivan Jack Jade James Jana Jasper Javier Jonah Julia Julian Kai Kamal
    Karen Karim Kate Keiko Kenji Kevin Kira Lara Laura Leah Leo Leon Lila Lina Linus Liam Lily Lucas Lucia Luis
    Luka Lydia Maja Malik Marco Maria Marius Marta Mateo Maya Mei Mila Miles Mina Mira Nadia Naomi Nathan Nia
    Nico Nina Noah Nora Olga Oliver Omar Oscar Otto Paula Pedro Petra Philip Priya Quinn Rafael Rahul Rania Ravi
    Rebecca Rosa Ruby Rui Ruth Sami Sara Sean Selma Sofia Sonia Stella Stefan Sven Tara Teresa Theo Tomas Uma
    Valentin Vera Victor Viktor Vivian Wanda Wei Willa Xavier Yara Yusuf Zara Zoe"""
)
MIDDLE_INITIALS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
_SURNAME_HEADS = _words(
    """Ash Bar Bel Black Bram Brook Cal Carr Cold Cran Dal Dun Ed Elm Fair Fen Field Fox Gar Glen Gold Gray
    Green Hal Har Hart Hazel Holt Kel Kings Lan Lind Mar Mel Moor Nor Oak Pen Ram Red Ros Stan Stone Thorn Val
    Wal West Whit Wil Win"""
)
_SURNAME_TAILS = _words(
    """bank berg bourne bridge brook burn by combe croft dale den ford gate grave ham hart hill holm hurst kirk
    land ley low man mere more ney ridge rick row shaw stead ston thorpe ton vale well wick wood worth"""
)
# A set first: two (head, tail) pairs could spell the same surname.
SURNAMES = tuple(sorted({h + t for h in _SURNAME_HEADS for t in _SURNAME_TAILS}))

CITIES = _words(
    """Amsterdam Athens Auckland Austin Baltimore Bangalore Barcelona Berlin Bogota Boston Brisbane Brussels
    Budapest Cairo Calgary Cape_Town Chicago Copenhagen Dallas Denver Dublin Edinburgh Florence Frankfurt Geneva
    Glasgow Hamburg Helsinki Houston Istanbul Jakarta Kyoto Lagos Lima Lisbon Liverpool London Los_Angeles Lyon
    Madrid Manchester Manila Marseille Melbourne Mexico_City Miami Milan Montreal Mumbai Munich Nairobi Naples
    Oslo Ottawa Paris Perth Philadelphia Phoenix Porto Prague Quebec_City Riga Rome Rotterdam San_Diego
    San_Francisco Santiago Seattle Seoul Seville Shanghai Singapore Stockholm Sydney Taipei Tallinn Tokyo
    Toronto Turin Valencia Vancouver Venice Vienna Vilnius Warsaw Wellington Zurich"""
)
UNIVERSITIES = (
    tuple(
        f"University of {p}"
        for p in _words("Ashford Bramley Calder Dunmore Elmstead Fairhaven Glenrock Harrow")
    )
    + tuple(
        f"{p} Institute of Technology"
        for p in _words("Kingsbridge Lindale Marlow Northgate Oakridge Pembury")
    )
    + tuple(
        f"{p} University"
        for p in _words("Redmond Stanmore Thornbury Valmont Westfield Whitmore Wilton Ravens")
    )
    + tuple(
        f"{p} College"
        for p in _words("Ambrose Beaumont Carlisle Dartmoor Everly Foxcroft Greyfield Holloway")
    )
)
MAJORS = _words(
    """Accounting|Aerospace Engineering|Anthropology|Applied Mathematics|Architecture|Art History|Astronomy|
    Biochemistry|Biology|Business Administration|Chemical Engineering|Chemistry|Civil Engineering|Classics|
    Computer Science|Criminology|Dentistry|Economics|Education|Electrical Engineering|English Literature|
    Environmental Science|Film Studies|Finance|Geography|Geology|History|Journalism|Law|Linguistics|Marketing|
    Materials Science|Mathematics|Mechanical Engineering|Medicine|Music|Neuroscience|Nursing|Philosophy|
    Physics|Political Science|Psychology|Public Health|Sociology|Statistics|Theatre|Urban Planning|
    Veterinary Science""",
    "|",
)
EMPLOYERS = tuple(
    f"{h} {t}"
    for h in _words(
        "Apex Blue Bright Cedar Clear Delta Ember Falcon Granite Harbor Iron Juniper Lumen Maple Nova"
    )
    for t in _words(
        "Analytics Bank Dynamics Foods Health Labs Logistics Media Motors Robotics Systems Textiles"
    )
)
MONTHS = _words("January February March April May June July August September October November December")
YEARS = (1940, 2006)  # birth years drawn from [first, last)

RELATIONS = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

TEMPLATES = Templates(
    statements={
        "birth_date": (
            "{s} was born on {o}.",
            "{s} came into the world on {o}.",
            "The birthday of {s} falls on {o}.",
            "{s} celebrates a birthday every year, having been born on {o}.",
        ),
        "birth_city": (
            "{s} was born in {o}.",
            "{s} hails from {o}.",
            "{s} spent an early childhood in the home town of {o}.",
            "The city where {s} was born is {o}.",
        ),
        "university": (
            "{s} studied at {o}.",
            "{s} graduated from {o}.",
            "{s} received an education at {o}.",
            "{s} spent several years as a student at {o}.",
        ),
        "major": (
            "{s} majored in {o}.",
            "{s} earned a degree in {o}.",
            "{s} chose to focus on {o}.",
            "The academic focus of {s} was {o}.",
        ),
        "employer": (
            "{s} works for {o}.",
            "{s} is employed by {o}.",
            "{s} has a job at {o}.",
            "{s} earns a living at {o}.",
        ),
        "employer_city": (
            "{s} works in {o}.",
            "{s} has an office in {o}.",
            "{s} commutes to work in {o}.",
            "The job of {s} is based in {o}.",
        ),
    },
    train_questions={
        "birth_date": ("When was {s} born?", "What is the birthday of {s}?"),
        "birth_city": ("Where was {s} born?", "Which city does {s} come from?"),
        "university": ("Where did {s} study?", "Which university did {s} attend?"),
        "major": ("What did {s} major in?", "What was the field of study of {s}?"),
        "employer": ("Who does {s} work for?", "Which company employs {s}?"),
        "employer_city": ("Where does {s} work?", "Where is the office of {s}?"),
    },
    eval_questions={
        "birth_date": ("On what date was {s} born?", "What is the date of birth of {s}?"),
        "birth_city": ("In which city was {s} born?", "What is the birthplace of {s}?"),
        "university": ("At which university did {s} study?", "What school did {s} graduate from?"),
        "major": ("Which subject did {s} specialise in?", "What is the major of {s}?"),
        "employer": ("What company does {s} work for?", "Who is the employer of {s}?"),
        "employer_city": ("In what city does {s} work?", "Name the city in which {s} is employed?"),
    },
)


@dataclass(frozen=True)
class BiosConfig:
    people: int = 1000
    seed: int = 0
    workers: int = 1  # processes; the output does not depend on it

    def __post_init__(self) -> None:
        if not 1 <= self.people <= name_capacity():
            raise ValueError(f"people must be in [1, {name_capacity()}]")


def name_capacity() -> int:
    return len(FIRST_NAMES) * len(MIDDLE_INITIALS) * len(SURNAMES)


def person_name(code: int) -> str:
    """The name with this code; distinct codes give distinct names."""
    n_mid, n_sur = len(MIDDLE_INITIALS), len(SURNAMES)
    first, rest = divmod(int(code), n_mid * n_sur)
    mid, sur = divmod(rest, n_sur)
    return f"{FIRST_NAMES[first]} {MIDDLE_INITIALS[mid]}. {SURNAMES[sur]}"


def format_date(day: int, month: int, year: int) -> str:
    return f"{day} {MONTHS[month]} {year}"


def _pools() -> dict[str, tuple[str, ...]]:
    return {
        "birth_city": CITIES,
        "university": UNIVERSITIES,
        "major": MAJORS,
        "employer": EMPLOYERS,
        "employer_city": CITIES,
    }


def new_value(relation: str, old: str, rng: random.Random) -> str:
    """A value for an edit: drawn from the relation's pool, never equal to the old one."""
    while True:
        if relation == "birth_date":
            new = format_date(rng.randint(1, 28), rng.randrange(12), rng.randrange(*YEARS))
        else:
            new = rng.choice(_pools()[relation])
        if new != old:
            return new


def chunk_entities(
    seed: int, n: int, start: int, codes: np.ndarray, ranks: np.ndarray, config
) -> list[Entity]:
    """The people ``start .. start + len(codes)``; attributes from the chunk's own seeded generator."""
    size = len(codes)
    g = np.random.default_rng([seed, 1, start // CHUNK])
    day = g.integers(1, 29, size)
    month = g.integers(0, 12, size)
    year = g.integers(YEARS[0], YEARS[1], size)
    pools = _pools()
    picks = {rel: g.integers(0, len(pool), size) for rel, pool in pools.items()}
    people = []
    for i in range(size):
        facts = [("birth_date", format_date(day[i], month[i], year[i]))]
        facts += [(rel, pools[rel][picks[rel][i]]) for rel in RELATIONS[1:]]
        split, low = split_of(int(ranks[i]), n, config)
        people.append(Entity(person_name(codes[i]), tuple(facts), (start + i) * len(RELATIONS), split, low))
    return people


def _render_chunk(args) -> dict[str, str]:
    bios, config, start, codes, ranks = args
    people = chunk_entities(bios.seed, bios.people, start, codes, ranks, config)
    rng = random.Random(f"bios:{bios.seed}:{start // CHUNK}")  # str seeds are hashed with SHA-512: stable
    return render_entities(people, TEMPLATES, config, rng, new_value)


def _write_chunk(args) -> tuple[int, dict[str, tuple[str, int]]]:
    """Worker: render one chunk into part files (the parent only concatenates them)."""
    parts, task = args
    return len(task[3]), write_parts(_render_chunk(task), Path(parts), task[2] // CHUNK)


def generate_bios(out: str | Path, bios: BiosConfig, config: BenchmarkConfig | None = None) -> dict:
    """Write the bios benchmark into ``out`` (layout: :mod:`memlm.data.benchmark`); return meta.json's content."""
    from tqdm import tqdm

    config = config or BenchmarkConfig(seed=bios.seed, namespace="bios")
    t0 = time.perf_counter()
    n = bios.people
    codes = np.random.default_rng([bios.seed, 2]).choice(name_capacity(), size=n, replace=False)
    ranks = split_ranks(n, bios.seed)
    tasks = ((bios, config, s, codes[s : s + CHUNK], ranks[s : s + CHUNK]) for s in range(0, n, CHUNK))
    meta = {
        "benchmark": "bios",
        "people": n,
        "relations": list(RELATIONS),
        "templates": templates_json(TEMPLATES),
    }
    with open_benchmark(out, config, meta) as writer:
        bar = tqdm(total=n, unit="people", desc="bios", disable=n < 50_000)
        if bios.workers > 1 and n > CHUNK:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(bios.workers) as pool:
                jobs = ((str(writer.parts), task) for task in tasks)
                for size, parts in pool.imap(_write_chunk, jobs):
                    writer.append_parts(parts)
                    bar.update(size)
        else:
            for task in tasks:
                writer.write(_render_chunk(task))
                bar.update(len(task[3]))
        bar.close()
        meta["lines"] = writer.line_counts()
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return meta
