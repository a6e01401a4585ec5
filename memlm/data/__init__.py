"""Data: knowledge benchmarks (bios, geo), ingestion, LMLM annotation, QA, and packed token files."""
