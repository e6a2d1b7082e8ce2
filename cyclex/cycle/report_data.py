"""The data of cyclex's HTML reports, prepared from run folders as plain dicts (no HTML here).

`run_page_data(RUN, PAGE)` gathers what one run's page shows: the generator and settings, the Cyclic
Rate overall and per finding (summary.json), who made the numbers (`provenance_rows`: cyclex version,
commit, libraries, device, date, and the scorer behind each figure, stand-ins named as such), the
metric means and figures of `cyclex evaluate` when present, and one item per image x removed finding (its images, the reports before and after split
into highlighted segments, the verdict, collateral changes, the item's metrics).
`comparison_page_data({"clean": RUN_A, "shortcut": RUN_B}, PAGE)` gathers the side-by-side audit of
several generators on the same images. `cyclex.cycle.report_html` renders both with jinja2.

Image links are relative to the page's folder and URL-quoted; paths a result line names must stay
inside the run folder. Numbers are formatted here (`format_number`, `format_rate`) so every page
shows them the same way; run text stays raw, the renderer escapes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cyclex.cycle.explainer import cyclic_rate
from cyclex.cycle.run_folder import RESULTS_NAME, SUMMARY_NAME
from cyclex.findings import ABNORMALITIES
from cyclex.jsonl import read_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "ITEM_IMAGES",
    "KEY_METRICS",
    "MentionFinder",
    "REPORT_NAME",
    "RunReportError",
    "comparison_page_data",
    "default_mention_finder",
    "format_number",
    "format_rate",
    "highlight_report",
    "generated_at",
    "load_run",
    "provenance_rows",
    "resolve_mentions",
    "run_page_data",
]

REPORT_NAME = "index.html"
METRICS_NAME = "metrics.jsonl"
# Keys every result line needs for a card (run_folder writes them all).
REQUIRED_KEYS = ("image_id", "finding", "verified", "report_before", "report_after", "query_png", "counterfactual_png")
# (key in the result line, caption) of the images shown per card, in order; optional ones may be null.
ITEM_IMAGES = (
    ("query_png", "Query"),
    ("reconstruction_png", "Reconstruction R (the maps' reference)"),
    ("counterfactual_png", "Counterfactual"),
    ("difference_png", "Difference (reference − CF)"),
    ("frame_png", "Feature frame"),
    ("guidance_map_png", "RSE guidance map G = M * R"),
    ("mask_png", "Ground-truth mask"),
    ("shortcut_mask_png", "Shortcut marker"),
    ("gradcam_png", "Grad-CAM baseline (image encoder, the finding's words)"),
)
# baseline maps written beside an item's PNGs after the run (`--baseline gradcam`), not named in its line
BASELINE_FILES = {"gradcam_png": "gradcam.png"}
# Metrics of `cyclex evaluate` shown on each card and in the header (others go in a collapsed table).
KEY_METRICS = (
    ("l1", "pixel L1"), ("l2", "pixel L2"), ("ssim", "SSIM"), ("psnr", "PSNR"), ("lpips", "LPIPS"),
    ("clip_cosine", "embedding cosine"), ("cpg", "CPG"), ("fet", "FET"), ("cf_score", "CF score (of 5)"),
    ("full/ncc", "NCC with mask"), ("full/auc", "pixel AUC (raw map, seed 000)"),
    ("full/auc_smoothed", "pixel AUC (smoothed map)"), ("full/auc_iou", "AUC-IoU"),
    ("mass_outside_chest_box", "map mass outside chest box"),
    ("boundary/auc", "boundary AUC"), ("dilated_boundary/auc", "dilated-boundary AUC"),
    ("heatmap/ncc", "NCC with eye tracking"),
)
# What a highlighted mention means, by CSS class.
HIGHLIGHT_TITLES = {
    "removed": "the removed finding",
    "added": "collateral: appeared after the removal",
    "lost": "collateral: disappeared after the removal",
}

MentionFinder = Callable[[str], Iterable[Any]]  # report -> objects with finding, start_char, end_char, state


class RunReportError(ValueError):
    """A run folder that cannot be reported: a missing file, a malformed line, an unsafe path."""


# -- text ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _rule_mentions() -> MentionFinder:
    from cyclex.labelers import RuleLabeler

    return RuleLabeler().mentions


def default_mention_finder() -> MentionFinder:
    """The rule labeler's `mentions` (spans of the whitespace-normalised report), built once."""
    return _rule_mentions()


def highlight_report(text: str, classes: Mapping[str, str], mentions: MentionFinder | None) -> list[dict[str, Any]]:
    """Split a report into segments, marking the mentions of the findings in `classes`.

    text: the report; classes: finding -> CSS class ("removed", "added", "lost"); mentions: a function
    giving the report's finding mentions with character offsets into the whitespace-normalised text
    (`RuleLabeler.mentions`), or None for no highlighting. Returns [{"text", "css", "title"}] whose
    texts join to the whitespace-normalised report; css/title are None for plain text. Overlapping
    mentions keep the first one.
    """
    normalised = " ".join(str(text).split())
    if mentions is None or not classes or not normalised:
        return [{"text": normalised, "css": None, "title": None}]
    spans = sorted(
        (int(m.start_char), int(m.end_char), m.finding, getattr(getattr(m, "state", None), "value", None))
        for m in mentions(normalised) if m.finding in classes
    )
    segments, cursor = [], 0
    for start, end, finding, state in spans:
        if start < cursor or not 0 <= start < end <= len(normalised):
            continue
        if start > cursor:
            segments.append({"text": normalised[cursor:start], "css": None, "title": None})
        title = f"{finding} ({state}): {HIGHLIGHT_TITLES[classes[finding]]}" if state else finding
        segments.append({"text": normalised[start:end], "css": classes[finding], "title": title})
        cursor = end
    if cursor < len(normalised):
        segments.append({"text": normalised[cursor:], "css": None, "title": None})
    return segments


# -- reading a run ---------------------------------------------------------------------------------
def load_run(run: str | os.PathLike) -> dict[str, Any]:
    """results.jsonl lines, summary.json (or the Cyclic Rate recomputed), metrics.jsonl rows by item."""
    root = Path(run)
    results_path = root / RESULTS_NAME
    if not results_path.is_file():
        raise RunReportError(f"{results_path} does not exist; is {root} a cyclex run folder?")
    lines = read_jsonl(results_path, REQUIRED_KEYS, error=RunReportError)
    summary_path = root / SUMMARY_NAME
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise RunReportError(f"{summary_path}: not valid JSON ({error.msg})") from None
        for key in ("cyclic_rate", "n", "per_finding"):
            if key not in summary:
                raise RunReportError(f"{summary_path}: missing key {key!r}")
    else:
        logger.warning("%s missing: recomputing the Cyclic Rate from %s", summary_path, RESULTS_NAME)
        summary = cyclic_rate(lines)
    metrics: dict[tuple[str, str], dict[str, Any]] = {}
    metrics_path = root / METRICS_NAME
    if metrics_path.is_file():
        for row in read_jsonl(metrics_path, ("image_id", "finding"), error=RunReportError):
            metrics[(str(row["image_id"]), str(row["finding"]))] = row
    settings = summary.get("settings")
    if not isinstance(settings, Mapping):
        config_path = root / "run_config.json"
        settings = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return {"root": root, "lines": lines, "summary": summary, "metrics": metrics, "settings": dict(settings)}


def _run_file(root: Path, value: Any, where: str) -> Path | None:
    """The file a result line names (relative to the run folder), refusing paths that leave it."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise RunReportError(f"{where}: expected a relative path string, got {value!r}")
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts:
        raise RunReportError(f"{where}: {value!r} must be a path inside the run folder (relative, no '..')")
    return root / relative


def _href(page_dir: Path, target: Path) -> str:
    """URL-quoted path of `target` relative to the page's folder (forward slashes)."""
    relative = os.path.relpath(os.path.abspath(target), os.path.abspath(page_dir))
    return quote(Path(relative).as_posix(), safe="/")


def _image(page_dir: Path, root: Path, line: Mapping[str, Any], key: str, caption: str, where: str) -> dict | None:
    path = _run_file(root, line.get(key), f"{where} {key}")
    if path is None:
        return None
    exists = path.is_file()
    if not exists:
        logger.warning("%s: %s missing", where, path)
    return {"key": key.removesuffix("_png"), "caption": caption, "href": _href(page_dir, path),
            "exists": exists, "path": line[key]}


# -- formatting ------------------------------------------------------------------------------------
def format_number(value: Any, digits: int = 3) -> str:
    """Numbers for tables: '-' for missing / NaN, integers as such, others with `digits` decimals."""
    if value is None or isinstance(value, bool):
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def format_rate(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f} %"


def _setting_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _finding_order(finding: str) -> tuple[int, str]:
    return (ABNORMALITIES.index(finding) if finding in ABNORMALITIES else len(ABNORMALITIES), finding)


def _metric_rows(row: Mapping[str, Any] | None) -> tuple[list[dict], list[dict]]:
    """(key metrics present, all other numeric metrics) of one metrics.jsonl row, as display rows."""
    if not row:
        return [], []
    shown = []
    for key, label in KEY_METRICS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        shown.append({"key": key, "label": label, "value": format_number(value)})
    listed = {key for key, _ in KEY_METRICS} | {"image_id", "finding", "verified", "cf_failed"}
    others = [{"key": k, "label": k, "value": format_number(v)} for k, v in row.items()
              if k not in listed and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return shown, others


def _metric_summary(summary: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Rows (label, all, verified) of summary.json's "metrics" means, or None without metrics."""
    metrics = summary.get("metrics")
    if not isinstance(metrics, Mapping):
        return None
    groups = [metrics.get(name) or {} for name in ("all", "verified")]
    rows = [{"label": "items", "values": [format_number(g.get("count")) for g in groups]}]
    for key, label in KEY_METRICS:
        values = [(g.get("mean") or {}).get(key) for g in groups]
        if any(v is not None for v in values):
            rows.append({"label": label, "values": [format_number(v) for v in values]})
    for key, label in (("cf_score_mean", "CF score mean"), ("acceptance_rate", "accepted (CF score 5)")):
        values = [g.get(key) for g in groups]
        if any(v is not None for v in values):
            rows.append({"label": label, "values": [format_number(v) for v in values]})
    return rows


def _figures(page_dir: Path, root: Path, summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """Figures of `cyclex evaluate`: the ones summary.json lists, then any other RUN/figures/*.png."""
    named = dict((summary.get("metrics") or {}).get("figures") or {}) if isinstance(summary.get("metrics"), Mapping) else {}
    paths: dict[Path, str] = {}
    for name, value in named.items():
        path = _run_file(root, value, f"{root / SUMMARY_NAME} metrics.figures.{name}")
        if path is not None and path.is_file():
            paths[path] = str(name).replace("_", " ")
    for path in sorted((root / "figures").glob("*.png")):
        paths.setdefault(path, path.stem.replace("_", " "))
    return [{"caption": caption, "href": _href(page_dir, path)} for path, caption in paths.items()]


def _scorer_text(described: Any) -> str:
    """One scorer's description as a line: its name (or rule), weights and their sha256, stand-in or not."""
    if not isinstance(described, Mapping):
        return _setting_text(described)
    parts = [str(described.get("name") or described.get("rule") or described.get("note") or "-")]
    if described.get("weights"):
        parts.append(f"weights {described['weights']}")
    digest = described.get("weights_sha256") or described.get("in_memory_weights_sha256")
    if isinstance(digest, str):
        parts.append(f"sha256 {digest[:12]}")
    if described.get("stand_in"):
        parts.append("(stand-in)")
    return ", ".join(parts)


def provenance_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """(key, value) rows of summary.json's "provenance" (the run) and "metrics"."provenance" (`cyclex evaluate`)."""
    rows: list[dict[str, str]] = []
    blocks = [("run", summary.get("provenance"))]
    if isinstance(summary.get("metrics"), Mapping):
        blocks.append(("evaluate", summary["metrics"].get("provenance")))
    for label, block in blocks:
        if not isinstance(block, Mapping):
            continue
        commit = f"{block.get('git_commit')}{' (uncommitted changes)' if block.get('git_dirty') else ''}"
        versions = ", ".join(f"{k} {v}" for k, v in (block.get("versions") or {}).items())
        rows += [{"key": f"{label}: cyclex", "value": f"{block.get('cyclex_version')}, commit {commit}"},
                 {"key": f"{label}: libraries", "value": versions},
                 {"key": f"{label}: device, date", "value": f"{block.get('device')}, {block.get('date')}"}]
        for role, described in (block.get("scorers") or {}).items():
            if role == "cf_score" and isinstance(described, Mapping):  # a search's scorers, one row each
                for inner, value in described.items():
                    rows.append({"key": f"{label}: search {inner}", "value": _scorer_text(value)})
            else:
                rows.append({"key": f"{label}: {role}", "value": _scorer_text(described)})
    return rows


def _per_finding(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for finding, entry in sorted(summary.get("per_finding", {}).items(), key=lambda kv: _finding_order(kv[0])):
        rows.append({"finding": finding, "n": entry.get("n"), "n_verified": entry.get("n_verified"),
                     "rate": format_rate(entry.get("cyclic_rate")), "rate_value": entry.get("cyclic_rate")})
    return rows


def _item(page_dir: Path, run: Mapping[str, Any], index: int, line: Mapping[str, Any],
          mentions: MentionFinder | None) -> dict[str, Any]:
    """Everything one card shows about one image x finding."""
    root = run["root"]
    where = f"{root / RESULTS_NAME} line {index + 1}"
    finding = str(line["finding"])
    added = [str(f) for f in line.get("collateral_added") or []]
    lost = [str(f) for f in line.get("collateral_lost") or []]
    before_classes = {finding: "removed", **{f: "lost" for f in lost}}
    after_classes = {finding: "removed", **{f: "added" for f in added}}
    item_dir = Path(str(line.get("query_png", ""))).parent
    line = {**line, **{key: str(item_dir / name) for key, name in BASELINE_FILES.items()
                       if key not in line and line.get("query_png") and (root / item_dir / name).is_file()}}
    images = [image for key, caption in ITEM_IMAGES
              if (image := _image(page_dir, root, line, key, caption, where)) is not None]
    metric_row = run["metrics"].get((str(line["image_id"]), finding))
    shown, others = _metric_rows(metric_row)
    frame = line.get("frame") if isinstance(line.get("frame"), Mapping) else {}
    return {
        "anchor": f"item-{index}",
        "image_id": str(line["image_id"]),
        "finding": finding,
        "verified": bool(line["verified"]),
        # with --search: whether a candidate met the required CF_Score (None without a search)
        "search_accepted": (line.get("maker_details") or {}).get("accepted"),
        "shortcut": line.get("shortcut"),
        "images": images,
        "images_by_key": {image["key"]: image for image in images},
        "report_before": highlight_report(line["report_before"], before_classes, mentions),
        "report_after": highlight_report(line["report_after"], after_classes, mentions),
        "source_prompt": line.get("source_prompt"),
        "target_prompt": line.get("target_prompt"),
        "collateral_added": added,
        "collateral_lost": lost,
        "frame_area": frame.get("area"),
        "frame_components": len(frame.get("components") or []),
        "frame_threshold": frame.get("threshold"),
        "metrics": shown,
        "other_metrics": others,
        "cf_failed": list((metric_row or {}).get("cf_failed") or []),
    }


def resolve_mentions(mentions: MentionFinder | None | str) -> MentionFinder | None:
    """"rules" -> the rule labeler's mentions; a callable is kept; None turns highlighting off."""
    return default_mention_finder() if mentions == "rules" else mentions


def generated_at() -> str:
    """When a page was written, as its header shows it (UTC, to the minute)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- page data ---------------------------------------------------------------------------------------
def run_page_data(run: str | os.PathLike, page: str | os.PathLike, *,
                  mentions: MentionFinder | None | str = "rules") -> dict[str, Any]:
    """Everything the page of one run folder shows, with image links relative to `page`'s folder.

    run: a folder written by `run_explainer`; mentions: as `resolve_mentions`.
    """
    run_data = load_run(run)
    root = run_data["root"]
    page_dir = Path(page).parent
    finder = resolve_mentions(mentions)
    summary = run_data["summary"]
    items = [_item(page_dir, run_data, i, line, finder) for i, line in enumerate(run_data["lines"])]
    settings = run_data["settings"]
    return dict(
        title=f"cyclex run: {settings.get('generator') or root.resolve().name}",
        run_name=root.resolve().name,
        generator=settings.get("generator"),
        generated=generated_at(),
        settings=[{"key": str(k), "value": _setting_text(v)} for k, v in sorted(settings.items())],
        provenance=provenance_rows(summary),
        summary=summary,
        overall_rate=format_rate(summary.get("cyclic_rate")),
        per_finding=_per_finding(summary),
        metric_summary=_metric_summary(summary),
        figures=_figures(page_dir, root, summary),
        items=items,
        findings=sorted({item["finding"] for item in items}, key=_finding_order),
        has_metrics=bool(run_data["metrics"]),
        highlighting=finder is not None,
    )


def comparison_page_data(runs: Mapping[str, str | os.PathLike], page: str | os.PathLike, *,
                         mentions: MentionFinder | None | str = "rules") -> dict[str, Any]:
    """Everything the side-by-side audit of two or more run folders shows (links relative to `page`).

    runs: generator name -> run folder, in column order. One row per (image, finding) removed by any
    run, in image order of first appearance then vocabulary order, with one cell per generator (None
    where that generator's report did not have the finding).
    """
    if len(runs) < 2:
        raise ValueError(f"a comparison needs at least two run folders, got {len(runs)}: {list(runs)}")
    page_dir = Path(page).parent
    finder = resolve_mentions(mentions)
    loaded = {str(name): load_run(path) for name, path in runs.items()}
    names = list(loaded)

    # 1. Summary numbers per generator
    generators = []
    for name, run_data in loaded.items():
        summary, root = run_data["summary"], run_data["root"]
        index_page = root / REPORT_NAME
        generators.append({
            "name": name,
            "generator": run_data["settings"].get("generator"),
            "run": str(root),
            "report_href": _href(page_dir, index_page) if index_page.is_file() else None,
            "n": summary.get("n"), "n_verified": summary.get("n_verified"),
            "rate": format_rate(summary.get("cyclic_rate")),
            "n_collateral_added": summary.get("n_collateral_added"),
            "n_collateral_lost": summary.get("n_collateral_lost"),
            "metric_summary": _metric_summary(summary),
            "provenance": provenance_rows(summary),
        })
    all_findings = sorted({f for r in loaded.values() for f in r["summary"].get("per_finding", {})}, key=_finding_order)
    per_finding = []
    for finding in all_findings:
        cells = []
        for run_data in loaded.values():
            entry = run_data["summary"].get("per_finding", {}).get(finding)
            cells.append(None if entry is None else {"rate": format_rate(entry.get("cyclic_rate")), "n": entry.get("n"),
                                                     "n_verified": entry.get("n_verified")})
        per_finding.append({"finding": finding, "cells": cells})
    metric_labels = []
    for generator in generators:
        for row in generator["metric_summary"] or []:
            if row["label"] not in metric_labels:
                metric_labels.append(row["label"])
    metric_table = [
        {"label": label, "values": [next((r["values"][0] for r in g["metric_summary"] or [] if r["label"] == label), "-")
                                    for g in generators]}
        for label in metric_labels
    ]

    # 2. One row per (image, finding) in any run: image order of first appearance, vocabulary order
    image_order: dict[str, int] = {}
    cells_by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for name, run_data in loaded.items():
        for index, line in enumerate(run_data["lines"]):
            image_id = str(line["image_id"])
            image_order.setdefault(image_id, len(image_order))
            cells_by_key.setdefault((image_id, str(line["finding"])), {})[name] = _item(
                page_dir, run_data, index, line, finder)
    rows = []
    for (image_id, finding), cells in sorted(cells_by_key.items(),
                                             key=lambda kv: (image_order[kv[0][0]], _finding_order(kv[0][1]))):
        present = [cells[name] for name in names if name in cells]
        reference = present[0]["images_by_key"]  # the query and ground truth are the same image's
        verdicts = {cell["verified"] for cell in present}
        rows.append({
            "anchor": f"row-{len(rows)}",
            "image_id": image_id,
            "finding": finding,
            "query": reference.get("query"),
            "mask": next((c["images_by_key"]["mask"] for c in present if "mask" in c["images_by_key"]), None),
            "marker": next((c["images_by_key"]["shortcut_mask"] for c in present
                            if "shortcut_mask" in c["images_by_key"]), None),
            "cells": [cells.get(name) for name in names],
            "agreement": "partial" if len(present) < len(names) else ("agree" if len(verdicts) == 1 else "differ"),
            "n_present": len(present),
            "shortcut": any(c.get("shortcut") for c in present),
        })
    return dict(
        title="cyclex comparison: " + " vs ".join(names),
        generated=generated_at(),
        names=names,
        generators=generators,
        per_finding=per_finding,
        metric_table=metric_table,
        rows=rows,
        findings=sorted({row["finding"] for row in rows}, key=_finding_order),
        highlighting=finder is not None,
    )
