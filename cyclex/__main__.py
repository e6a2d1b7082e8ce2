"""`python -m cyclex` runs the command line."""

from cyclex.cli import app

app()
