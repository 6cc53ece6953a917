"""Benchmark tasks with exact answers, generated in code: data files, a verifier, presets, accuracy."""
