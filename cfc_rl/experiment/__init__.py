"""Experiments: benchmarks, and (soon) training, evaluation and comparison from YAML files."""
