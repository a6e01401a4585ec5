"""Evaluation: knowledge QA (exact match, per split and relation, retrieval hit rate)."""
