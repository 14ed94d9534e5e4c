"""``python -m hamacho`` runs the CLI."""

from hamacho.cli import main

main()
