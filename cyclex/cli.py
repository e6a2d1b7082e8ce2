"""The `cyclex` command line: a thin layer over the Python API (typer + rich)."""

from __future__ import annotations

import typer

app = typer.Typer(help="cyclex: cyclic counterfactual explanations for chest X-ray report generators.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """cyclex command line."""
