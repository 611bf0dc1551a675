"""`python -m mlops`: the CLI (`mlops --help`), the one entry point of the project."""

from mlops.cli import main

main()
