"""Scoring models: held-out comparison with the base, lm-evaluation-harness benchmarks, the comparison report."""
