"""Data: knowledge benchmarks (bios, geo), ingestion, LMLM annotation, QA, and packed token files.

- ``facts``: the ``facts.jsonl`` format (what the bank imports), validation, ``apply_edits``.
- ``benchmark``: the shared folder layout of a knowledge benchmark (facts, corpora, QA, splits, edits, deletions).
- ``bios``: synthetic people, 1k-1M, unique names, deterministic by seed. ``geo``: GeoNames countries and cities.
- ``ingest``: a user's JSONL facts/triples and text/markdown chunks, checked before anything is written.
- ``annotate``: LMLM lookup calls in text and the loss mask that hides looked-up values.
- ``text`` / ``pack``: training documents in, packed token windows out.

Formats and commands: docs/data.md.
"""
