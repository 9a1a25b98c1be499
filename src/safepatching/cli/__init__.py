"""The `safepatching` command line: thin commands grouped as stages, patches and experiments."""

from safepatching.cli.application import app, main

__all__ = ["app", "main"]
