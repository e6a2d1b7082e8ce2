"""HTML reports of run folders: escaping, links that exist, numbers equal summary.json's, comparisons, CLI."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_reports, query
from PIL import Image
from typer.testing import CliRunner

from cyclex.adapters import CallableGenerator, GeneratorInfo
from cyclex.cli import app
from cyclex.cycle import CyclicExplainer
from cyclex.cycle import report_data as rd
from cyclex.cycle import report_html as rh
from cyclex.cycle.run_folder import run_explainer
from cyclex.explain.evaluate_run import evaluate_run

HOSTILE = ' <script>alert(1)</script> "quoted" & co'
# image id -> (heart, effusion, edema)
QUERIES = {"a": (0.9, 0.9, 0.1), "b": (0.9, 0.1, 0.1), "c": (0.9, 0.9, 0.9), 'x<b>"&': (0.1, 0.9, 0.1)}


class _PageParser(HTMLParser):
    """Collects image sources, links, text of tables by id, and elements' data-* attributes."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.tables, self.filterable = [], [], {}, []
        self._table, self._row, self._cell = None, None, None
        self.scripts, self._in_script = [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if "filterable" in (attrs.get("class") or "").split():
            self.filterable.append(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        if tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        if tag in ("td", "th") and self._row is not None:
            self._cell = []
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        if tag == "table":
            self._table, self._row = None, None
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_script:
            self.scripts.append(data)


def _parse(page: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _hostile_generator():
    return CallableGenerator(lambda images: [r + "," + HOSTILE for r in brightness_reports(images)],
                             GeneratorInfo(name="fake:hostile", channels=1))


def _records(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, (image_id, values) in enumerate(QUERIES.items()):
        path = folder / f"image{index}.png"
        Image.fromarray(np.uint8(query(*values)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": image_id, "image": str(path), "chest_box": [0, 0, 32, 32], "masks": {}})
    mask = np.zeros((32, 32), np.uint8)
    mask[10:22, 10:22] = 255
    Image.fromarray(mask).save(folder / "a__cardiomegaly.png")
    records[0]["masks"] = {"Cardiomegaly": str(folder / "a__cardiomegaly.png")}
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run folders on the same images: 'hostile' (every finding) and 'second' (Cardiomegaly only,
    removal ineffective), the first one evaluated (metrics.jsonl, figures)."""
    root = tmp_path_factory.mktemp("report")
    records = _records(root / "in")
    first = root / "runs" / "hostile"
    run_explainer(CyclicExplainer(_hostile_generator(), KeywordLabeler(), PaintingMaker(ineffective={"Edema"}),
                                  frame_threshold=95),
                  records, first, batch_size=2, progress=False, run_settings={"generator": "fake<gen>&"})
    evaluate_run(first)
    second = root / "runs" / "second"
    run_explainer(CyclicExplainer(_hostile_generator(), KeywordLabeler(), PaintingMaker(ineffective={"Cardiomegaly"}),
                                  frame_threshold=95),
                  records, second, findings=["Cardiomegaly"], batch_size=4, progress=False)
    return first, second


def _lines(run: Path):
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def _assert_links_resolve(page: Path, parser: _PageParser) -> None:
    assert parser.sources
    for href in parser.sources + [link for link in parser.links if not link.startswith("#")]:
        parts = urlsplit(href)
        assert not parts.scheme and not parts.netloc and not href.startswith("/"), href
        assert (page.parent / unquote(parts.path)).is_file(), href


def test_run_report_escapes_and_links(runs):
    run = runs[0]
    page = rh.write_run_report(run)
    assert page == run / "index.html"
    html = page.read_text(encoding="utf-8")
    parser = _parse(page)
    # every report carries the hostile text: it must appear escaped, never as markup
    assert "<script>alert(1)</script>" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &#34;quoted&#34; &amp; co" in html
    assert "x&lt;b&gt;&#34;&amp;" in html and "fake&lt;gen&gt;&amp;" in html
    assert "alert" not in "".join(parser.scripts)  # no run text inside the page's script
    assert not list(run.glob(".index.html.*"))  # the atomic write left no temporary file
    assert page.stat().st_mode & 0o777 == 0o644
    _assert_links_resolve(page, parser)
    # one card per result line, every non-null image of the line shown
    lines = _lines(run)
    assert [(c["data-finding"], c["data-verified"]) for c in parser.filterable] == [
        (line["finding"], "yes" if line["verified"] else "no") for line in lines]
    image_keys = [k for k, _ in rd.ITEM_IMAGES]
    expected_sources = [line[k] for line in lines for k in image_keys if line.get(k)]
    assert [unquote(s) for s in parser.sources if "figures/" not in s] == expected_sources
    assert lines[0]["mask_png"] and lines[0]["mask_png"] in expected_sources
    # the quoted href of the odd image id decodes to the real file
    odd = next(line for line in lines if line["image_id"] == 'x<b>"&')
    assert any(unquote(s) == odd["query_png"] for s in parser.sources)


def test_run_report_numbers_equal_summary(runs):
    run = runs[0]
    page = rh.write_run_report(run, mentions=None)
    summary = json.loads((run / "summary.json").read_text())
    parser = _parse(page)
    table = parser.tables["per-finding"]
    assert table[0] == ["finding removed", "removals", "verified", "Cyclic Rate"]
    rows = {row[0]: row[1:] for row in table[1:]}
    assert set(rows) == set(summary["per_finding"])
    for finding, entry in summary["per_finding"].items():
        assert rows[finding] == [str(entry["n"]), str(entry["n_verified"]), f"{100 * entry['cyclic_rate']:.1f} %"]
    html = page.read_text()
    assert f'id="overall-rate">{100 * summary["cyclic_rate"]:.1f} %<' in html
    assert f"{summary['n_verified']} of {summary['n']} removals verified" in html
    # header metric means and per-card metrics come from evaluate_run's outputs
    metric_rows = {row[0]: row[1:] for row in parser.tables["metric-summary"][1:]}
    assert metric_rows["pixel L1"] == [f"{summary['metrics'][g]['mean']['l1']:.3f}" for g in ("all", "verified")]
    first_metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert f"<span>SSIM</span><span class=\"v\">{first_metrics['ssim']:.3f}</span>" in html
    assert f"<span>NCC with mask</span><span class=\"v\">{first_metrics['full/ncc']:.3f}</span>" in html
    figures = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert figures and all(f'src="figures/{name}"' in html for name in figures)


def test_highlighting_marks_mentions(runs):
    class Mention:
        def __init__(self, finding, start, end):
            self.finding, self.start_char, self.end_char, self.state = finding, start, end, None

    def finder(text):
        found = []
        for word, finding in KeywordLabeler.words.items():
            start = text.find(word)
            if start >= 0:
                found.append(Mention(finding, start, start + len(word)))
        return found

    segments = rd.highlight_report("cardiomegaly,   effusion <b>", {"Pleural Effusion": "removed", "Edema": "added"},
                                   finder)
    assert segments == [{"text": "cardiomegaly, ", "css": None, "title": None},
                        {"text": "effusion", "css": "removed", "title": "Pleural Effusion"},
                        {"text": " <b>", "css": None, "title": None}]
    page = rh.write_run_report(runs[0], runs[0] / "custom.html", mentions=finder)
    html = page.read_text()
    assert '<mark class="removed" title="Cardiomegaly">cardiomegaly</mark>' in html
    # the default: the rule labeler's mentions
    html = rh.write_run_report(runs[0]).read_text()
    assert '<mark class="removed" title="Cardiomegaly (positive): the removed finding">cardiomegaly</mark>' in html


def test_comparison_report(runs, tmp_path):
    first, second = runs
    out = tmp_path / "audit" / "comparison.html"
    rh.write_run_report(first, mentions=None)
    page = rh.write_comparison_report({"hostile": first, "second": second}, out, mentions=None)
    parser = _parse(page)
    _assert_links_resolve(page, parser)
    generators = parser.tables["generators"]
    assert [row[0].split()[0] for row in generators[1:]] == ["hostile", "second"]
    for row, run in zip(generators[1:], runs, strict=True):
        summary = json.loads((run / "summary.json").read_text())
        assert row[1:4] == [str(summary["n"]), str(summary["n_verified"]), f"{100 * summary['cyclic_rate']:.1f} %"]
    per_finding = {row[0]: row[1:] for row in parser.tables["per-finding"][1:]}
    second_summary = json.loads((second / "summary.json").read_text())
    assert per_finding["Cardiomegaly"][1] == (f"{100 * second_summary['per_finding']['Cardiomegaly']['cyclic_rate']:.1f} %"
                                              f" ({second_summary['per_finding']['Cardiomegaly']['n_verified']}/"
                                              f"{second_summary['per_finding']['Cardiomegaly']['n']})")
    assert per_finding["Pleural Effusion"][1] == "-"
    # one row per (image, finding) of either run; Cardiomegaly is removed by both with different verdicts
    keys = {(line["image_id"], line["finding"]) for run in runs for line in _lines(run)}
    assert len(parser.filterable) == len(keys)
    agreement = {(row["data-finding"], row["data-agreement"]) for row in parser.filterable}
    assert ("Cardiomegaly", "differ") in agreement and ("Pleural Effusion", "partial") in agreement
    html = page.read_text()
    assert "Pleural Effusion is not in this generator's report" in html
    assert "<script>alert(1)</script>" not in html
    with pytest.raises(ValueError, match="at least two"):
        rh.write_comparison_report({"only": first}, out)


def test_bad_run_folders(runs, tmp_path):
    with pytest.raises(rh.RunReportError, match="results.jsonl does not exist"):
        rh.write_run_report(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    line = _lines(runs[0])[0]
    line["frame_png"] = "../../etc/passwd"
    (broken / "results.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(rh.RunReportError, match="frame_png.*inside the run folder"):
        rh.write_run_report(broken, mentions=None)
    del line["report_after"]
    (broken / "results.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(rh.RunReportError, match=r"results.jsonl:1: missing keys \['report_after'\]"):
        rh.write_run_report(broken, mentions=None)


def test_run_names_and_default_path(tmp_path):
    names = rh.run_names([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"])
    assert list(names) == ["a/run", "b/run", f"{tmp_path.name}/c"]
    assert rh.default_comparison_path([tmp_path / "x" / "clean", tmp_path / "x" / "shortcut"]) == Path(
        os.path.abspath(tmp_path / "x" / "comparison.html"))


def test_cli_report(runs, tmp_path):
    first, second = runs
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(first), "--no-highlight"])
    assert result.exit_code == 0, result.output
    assert (first / "index.html").is_file()
    out = tmp_path / "both.html"
    result = runner.invoke(app, ["report", str(first), str(second), "--out", str(out), "--no-highlight"])
    assert result.exit_code == 0, result.output
    assert (second / "index.html").is_file()
    generators = _parse(out).tables["generators"]
    assert [row[0].split()[0] for row in generators[1:]] == ["hostile", "second"]
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in " ".join(result.output.split())
