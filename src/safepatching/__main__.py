"""`python -m safepatching`: the command line."""

from safepatching.cli.application import main

main()
