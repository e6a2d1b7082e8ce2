"""HTML reports of cyclex run folders: one page per run, one side-by-side page per audit of generators.

`write_run_report(RUN)` writes `RUN/index.html`: the generator and settings, the Cyclic Rate overall
and per finding (the numbers of `RUN/summary.json`), the metric means and figures of `cyclex evaluate`
when present, then one card per image x removed finding (query, counterfactual, difference overlay,
frame, ground-truth mask and shortcut marker when the run has them; the report before and after with
the removed finding's mentions highlighted; the cycle verdict; collateral changes; the item's metrics).

`write_comparison_report({"clean": RUN_A, "shortcut": RUN_B}, OUT)` writes one page auditing several
generators on the same images: summary numbers on top, then per image and finding each generator's
frame, counterfactual and verdict in adjacent columns.

This module renders; `cyclex.cycle.report_data` prepares what the pages show as plain dicts.
Pages are self-contained (inline CSS and a few lines of inline JS for the filters; no network, they
work from file://). Images are `<img>` links, relative to the page and URL-quoted, so a run folder
can be moved or zipped with its report. Every text from a run (reports, ids, settings) is escaped by
jinja2's autoescape; no run text is ever placed inside a script.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from cyclex.atomic_io import write_text_atomic
from cyclex.cycle.report_data import (
    REPORT_NAME,
    MentionFinder,
    RunReportError,
    comparison_page_data,
    format_number,
    format_rate,
    run_page_data,
)
from cyclex.cycle.run_ownership import RunFolderError, inspect_run_folder, locked_run_folder
from cyclex.file_names import printable_text

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_NAME",
    "RunReportError",
    "default_comparison_path",
    "render_page",
    "run_names",
    "write_comparison_report",
    "write_run_report",
]

TEMPLATE_DIR = Path(__file__).parent / "templates"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,  # every report, id and setting is generator / user text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        # folder and file names that are not UTF-8 (surrogate escapes) are shown as \xNN, never fail the page
        finalize=lambda value: printable_text(value) if isinstance(value, str) else value,
    )
    env.filters["number"] = format_number
    env.filters["rate"] = format_rate
    return env


def render_page(template: str, page_data: Mapping[str, Any]) -> str:
    """The HTML of `template` (a file of `templates/`) filled with `page_data` (from `report_data`)."""
    return _environment().get_template(template).render(**page_data)


def write_run_report(run: str | os.PathLike, out_html: str | os.PathLike | None = None, *,
                     mentions: MentionFinder | None | str = "rules") -> Path:
    """Write the HTML report of one run folder; returns its path (default `RUN/index.html`).

    run: a folder written by `run_explainer` (results.jsonl, summary.json, items/; metrics.jsonl and
    figures/ from `cyclex evaluate` when present). out_html: another place for the page (image links
    are made relative to it). mentions: "rules" highlights the findings' mentions found by the rule
    labeler, a callable (report -> mentions) uses that, None turns highlighting off.
    """
    out = Path(out_html) if out_html is not None else Path(run) / REPORT_NAME
    if not Path(run).is_dir():
        raise RunReportError(f"{Path(run) / 'results.jsonl'} does not exist: {run} is not a cyclex run folder")
    try:  # a folder of results only (no marker, no run_config.json) is reported on its contents, unlocked
        inspect_run_folder(run)
        hold = locked_run_folder(run)
    except RunFolderError:
        hold = contextlib.nullcontext()
    with hold:  # never a page of a run half rewritten by a live `explain --overwrite`
        page_data = run_page_data(run, out, mentions=mentions)
        write_text_atomic(out, render_page("run_report.html.jinja", page_data))
    logger.info("report of %s (%d items) -> %s", Path(run), len(page_data["items"]), out)
    return out


def write_comparison_report(runs: Mapping[str, str | os.PathLike], out_html: str | os.PathLike, *,
                            mentions: MentionFinder | None | str = "rules") -> Path:
    """Write a side-by-side audit of two or more generators' run folders on the same images.

    runs: generator name -> run folder (in column order); out_html: the page to write (image links
    are relative to its folder). The page shows each run's Cyclic Rate overall and per finding, then
    one row per (image, finding) removed by any of the runs, with every generator's frame,
    counterfactual and verdict in adjacent columns ("not in this generator's report" where that
    generator's report did not have the finding). Returns the page's path.
    """
    out = Path(out_html)
    page_data = comparison_page_data(runs, out, mentions=mentions)
    write_text_atomic(out, render_page("comparison_report.html.jinja", page_data))
    logger.info("comparison of %s (%d rows) -> %s", ", ".join(page_data["names"]), len(page_data["rows"]), out)
    return out


def run_names(runs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Column names for run folders: their folder names, with parent folders added where two clash."""
    paths = [Path(run).resolve() for run in runs]
    if len(set(paths)) != len(paths):
        raise ValueError(f"the same run folder is given twice: {[str(p) for p in paths]}")
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > max(len(p.parts) for p in paths):
            return dict(zip(names, [Path(run) for run in runs], strict=True))
        depth += 1


def default_comparison_path(runs: Sequence[str | os.PathLike]) -> Path:
    """Where `cyclex report A B` puts the comparison: `comparison.html` in the runs' common folder."""
    common = Path(os.path.commonpath([os.path.abspath(run) for run in runs]))
    if common in {Path(os.path.abspath(run)) for run in runs}:
        common = common.parent
    return common / "comparison.html"
