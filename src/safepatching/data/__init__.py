"""Data: sources and splits, named benchmarks, train/eval overlap checks, chat formatting, evaluation sets."""
