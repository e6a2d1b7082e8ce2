"""Writers of an audit: AUDIT/audit.json, overlay PNGs of suspected shortcut regions, AUDIT/audit.html.

`audit_runs(RUNS, OUT)` is the one call behind `cyclex audit RUN_A RUN_B --out AUDIT`::

    from cyclex.cycle.audit_report import audit_runs
    audit = audit_runs({"clean": "runs/demo/clean", "shortcut": "runs/demo/shortcut"}, "runs/audit")
    print([(f["generator"], f["finding"], f["statistic"]) for f in audit["shortcut_flags"]])

`audit_generators` first explains the same images with each generator (`run_explain`, one run folder
per generator under OUT/runs/) and then audits them. The numbers come from `cyclex.cycle.audit`
(pure); this module draws and renders. The page reuses the comparison page's rows (reports before
and after, verdicts, frames) with the finding and verdict filters, under the audit's own tables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cyclex.atomic_io import write_json_atomic, write_png_atomic, write_text_atomic
from cyclex.cycle.audit import compute_audit
from cyclex.cycle.report_data import comparison_page_data, generated_at
from cyclex.cycle.report_html import render_page
from cyclex.cycle.run_folder import read_results, safe_name
from cyclex.findings import finding_slug
from cyclex.jsonl import to_json_safe

logger = logging.getLogger(__name__)

__all__ = ["AUDIT_JSON", "AUDIT_HTML", "audit_generators", "audit_runs", "shortcut_overlay", "write_audit"]

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"


def shortcut_overlay(queries: Sequence[np.ndarray], maps: Sequence[np.ndarray], box: Sequence[int] | None) -> np.ndarray:
    """(H, W, 3) uint8: the mean query in grey, the mean normalised positive map in red, the suspected box in yellow.

    queries, maps: (H, W) arrays in [0, 1] / >= 0 of the items of one (generator, finding).
    """
    import cv2

    mean_query = np.mean([np.asarray(q, dtype=np.float64) for q in queries], axis=0)
    normalised = [m / m.max() if m.max() > 0 else m for m in (np.asarray(m, dtype=np.float64) for m in maps)]
    heat = np.mean(normalised, axis=0)
    heat = heat / heat.max() if heat.max() > 0 else heat
    grey = np.uint8(np.clip(mean_query, 0, 1) * 255)
    picture = np.stack([grey] * 3, axis=-1).astype(np.float64)
    picture[..., 0] = np.clip(picture[..., 0] * (1 - 0.6 * heat) + 255 * 0.6 * heat, 0, 255)  # red in RGB
    picture[..., 1] *= 1 - 0.6 * heat
    picture[..., 2] *= 1 - 0.6 * heat
    picture = np.uint8(picture)
    scale = max(1, 256 // max(picture.shape[:2]))  # phantoms are 64 px: draw at 256 so the box shows
    picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    if box is not None:
        x0, y0, x1, y1 = (int(v) * scale for v in box)
        cv2.rectangle(picture, (x0, y0), (x1 - 1, y1 - 1), (255, 220, 0), max(1, scale // 2))
    return picture


def _overlays(audit: Mapping[str, Any], runs: Mapping[str, Path], out: Path) -> dict[tuple[str, str], str]:
    """One overlay PNG per flagged (generator, finding) and per other pair with an outside peak."""
    import cv2

    written = {}
    for finding, entry in audit["findings"].items():
        for name, test in entry["shortcut"].items():
            if test["n_items"] == 0 or (not test["flagged"] and test["suspected_box"] is None):
                continue
            lines = [ln for ln in read_results(runs[name]) if ln["finding"] == finding]
            queries = [cv2.imread(str(runs[name] / ln["query_png"]), cv2.IMREAD_GRAYSCALE) / 255.0 for ln in lines]
            maps = [np.squeeze(np.load(runs[name] / ln["files"]["positive_npy"], allow_pickle=False)) for ln in lines]
            rel = Path("overlays") / f"{safe_name(name)}__{finding_slug(finding)}.png"
            write_png_atomic(out / rel, shortcut_overlay(queries, maps, test["suspected_box"]))
            written[(name, finding)] = str(rel)
    return written


def write_audit(audit: dict[str, Any], runs: Mapping[str, str | os.PathLike], out: str | os.PathLike, *,
                mentions: Any = "rules") -> dict[str, Any]:
    """Write AUDIT/audit.json (with provenance), overlays/ and audit.html; returns the audit with paths added."""
    from cyclex.provenance import environment

    out = Path(out)
    roots = {name: Path(path) for name, path in runs.items()}
    overlays = _overlays(audit, roots, out)
    for finding, entry in audit["findings"].items():
        for name, test in entry["shortcut"].items():
            test["overlay_png"] = overlays.get((name, finding))
    for flag in audit["shortcut_flags"]:
        flag["overlay_png"] = overlays.get((flag["generator"], flag["finding"]))
    audit["provenance"] = environment()
    write_json_atomic(out / AUDIT_JSON, to_json_safe(audit))
    page = out / AUDIT_HTML
    write_text_atomic(page, render_page("audit_report.html.jinja", audit_page_data(audit, roots, page, mentions=mentions)))
    audit["files"] = {"json": str(out / AUDIT_JSON), "html": str(page)}
    logger.info("audit of %s -> %s", ", ".join(roots), out)
    return audit


def _format(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(values: Sequence[float] | None) -> str:
    return "-" if not values else f"[{values[0]:.2f}, {values[1]:.2f}]"


def audit_page_data(audit: Mapping[str, Any], runs: Mapping[str, Path], page: Path, *, mentions: Any = "rules") -> dict:
    """What the audit page shows: the comparison rows plus the audit's tables (numbers formatted here)."""
    comparison = comparison_page_data(runs, page, mentions=mentions)
    names = audit["names"]
    finding_rows = []
    for finding, entry in audit["findings"].items():
        rates = [entry["rates"][name] for name in names]
        finding_rows.append({
            "finding": finding,
            "rates": [{"text": _format(r["cyclic_rate"]), "ci": _interval(r["ci95"]), "n": r["n"], "k": r["n_verified"]}
                      for r in rates],
            "differences": [{"label": label, "text": _format(d["difference"], 2), "ci": _interval(d["ci95"])}
                            for label, d in entry["differences"].items()],
            "agreement": [{"label": label, "ncc": _format(a["mean_ncc"]), "iou": _format(a["mean_iou"]), "n": a["n_pairs"]}
                          for label, a in entry["frame_agreement"].items()],
        })
    shortcut_rows = []
    for finding, entry in audit["findings"].items():
        for name in names:
            test = entry["shortcut"][name]
            if test["n_items"] == 0:
                continue
            shortcut_rows.append({
                "generator": name, "finding": finding, "flagged": test["flagged"],
                "k": test["n_consistent_outside"], "n": test["n_items"], "statistic": _format(test["statistic"]),
                "lower": _format(test["statistic_ci95"][0] if test["statistic_ci95"] else None),
                "outside_chest": _format(test["mean_outside_chest_mass"]),
                "outside_prior": _format(test["mean_outside_prior_mass"]),
                "box": test["suspected_box"],
                "overlay": test.get("overlay_png"),
            })
    return dict(comparison, title="cyclex audit: " + " vs ".join(names), generated=generated_at(),
                finding_rows=finding_rows, shortcut_rows=shortcut_rows, audit_names=names,
                flags=audit["shortcut_flags"], rule=audit["shortcut_rule"],
                reference=names[0], provenance=audit.get("provenance", {}))


def audit_runs(runs: Mapping[str, str | os.PathLike], out: str | os.PathLike, *,
               chest_boxes: Mapping[str, Sequence[int]] | None = None, mentions: Any = "rules",
               baseline: str | None = None, generators: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Audit finished run folders (name -> folder, same images) and write the audit into `out`.

    baseline: "gradcam" first writes Grad-CAM baseline maps into each run (`cyclex.cycle.audit_baselines`,
    generators: run name -> that run's generator), shown beside the frames on the page.
    """
    from cyclex.cycle.audit_baselines import write_baselines

    write_baselines(baseline, dict(runs), dict(generators or {}))
    return write_audit(compute_audit(runs, chest_boxes=chest_boxes), runs, out, mentions=mentions)


def audit_generators(generators: Mapping[str, tuple[Any, str | os.PathLike]], records: Any, out: str | os.PathLike,
                     settings: Any = None, *, generator_specs: Mapping[str, str] | None = None,
                     labeler_spec: str | None = "rules", progress: bool = True, overwrite: bool = False,
                     mentions: Any = "rules", baseline: str | None = None) -> dict[str, Any]:
    """Explain `records` with each generator, then audit: name -> (generator, tailored SD folder).

    Each generator's run goes to OUT/runs/NAME (resumable, as `cyclex explain`); settings: one
    `ExplainSettings` for all (like with like); baseline: "gradcam" adds Grad-CAM maps (`audit_runs`).
    Returns the audit (also OUT/audit.json).
    """
    from cyclex.cycle.run_folder import load_image_records, run_explain

    out = Path(out)
    if isinstance(records, (str, Path)):
        records = load_image_records(records)
    runs = {}
    for name, (generator, tailored) in generators.items():
        runs[name] = out / "runs" / safe_name(name)
        run_explain(generator, tailored, records, runs[name], settings, labeler_spec=labeler_spec,
                    generator_spec=(generator_specs or {}).get(name), progress=progress, overwrite=overwrite)
    boxes = {str(r["id"]): r["chest_box"] for r in records if r.get("chest_box")}
    return audit_runs(runs, out, chest_boxes=boxes, mentions=mentions, baseline=baseline,
                      generators={name: generator for name, (generator, _) in generators.items()})
