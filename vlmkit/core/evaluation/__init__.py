"""Evaluation: evaluators registered through ``register_evaluators``, the generation and scoring
helpers they share, and the runner that writes their results (JSON, markdown, PNG)."""
