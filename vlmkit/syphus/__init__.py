"""Syphus: instruction-response pairs generated from visual annotations by any LLM backend, written in
the MIMIC-IT on-disk format (REFERENCE 1.6 and 5).

annotations (JSONL) -> prompts (a task file: system message, annotation template, in-context examples)
-> LLM backend (cached per prompt) -> parsed pairs -> quality filters (rejects kept, counted by reason)
-> related instructions (same media, instruction similarity) -> translations -> MIMIC-IT files."""
