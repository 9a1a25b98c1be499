"""Evaluation: generation, decoding-time defences, judges, jailbreaks, metrics, utility tasks and the suite."""
