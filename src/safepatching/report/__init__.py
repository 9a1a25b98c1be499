"""Reports: markdown tables, result files (JSON, JSONL) and plots."""
