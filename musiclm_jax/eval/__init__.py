"""Evaluation: codec quality, retrieval, semantic tokens, generation."""
