from safepatching.cli import main

main()
