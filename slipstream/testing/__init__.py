"""Helpers shared by tests and benchmarks: a tiny random-weight model and tokenizer."""
