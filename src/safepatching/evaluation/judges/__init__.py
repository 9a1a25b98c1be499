"""Judges of replies: rule judges, LLM judges and the registry that picks one by name."""
