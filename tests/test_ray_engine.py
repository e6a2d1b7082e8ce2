"""--engine ray (cycle/ray_engine.py) in a local Ray instance on the CPU: map_batches with the callable
ExplainWorker writes the run folder one process writes; a resume redoes nothing that is done.

Needs the extra: pip install 'cyclex[ray]'."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
from distributed_explain_script import QUERIES, make_explainer, make_queries

from cyclex.cycle import run_folder as rf
from cyclex.cycle.ray_engine import ExplainWorker, import_ray, run_explainer_ray

TESTS = str(Path(__file__).resolve().parent)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _without_timings(lines):
    return [{k: v for k, v in line.items() if k != "timings"} for line in lines]


@pytest.fixture(scope="module")
def local_ray():
    ray = import_ray()
    # the workers import the test doubles (distributed_explain_script, cycle_fakes) from here
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_worker_batch_is_the_plain_loop(tmp_path):
    """One call of the callable class on a batch, as map_batches makes it, without Ray."""
    import numpy as np

    records = make_queries(tmp_path / "in", ["a", "b/1"])
    out = tmp_path / "run"
    out.mkdir()
    worker = ExplainWorker(make_explainer, str(out), {"variant": "painting"}, None, None, None)
    answer = worker({"record": np.array([json.dumps(r) for r in records], dtype=object),
                     "done": np.array(["[]", "[]"], dtype=object)})
    assert list(answer["id"]) == ["a", "b/1"] and list(answer["failed"]) == ["", ""]
    # a: Cardiomegaly and Pleural Effusion removed, each its own record file, then the image's _complete.json
    written = sorted(p.name for p in (out / "records" / "a").iterdir())
    assert len(written) == 3 and "_complete.json" in written
    assert json.loads((out / "records" / "a" / "_complete.json").read_text())["findings"] == [
        "Cardiomegaly", "Pleural Effusion"]


def test_ray_run_is_the_single_process_run_and_resumes(tmp_path, local_ray):
    records = make_queries(tmp_path / "in")
    rf.run_explainer(make_explainer(), records, tmp_path / "single", batch_size=2, progress=False)
    reference = _lines(tmp_path / "single")
    out = tmp_path / "ray"
    summary = run_explainer_ray(partial(make_explainer), records, out, batch_size=2, num_workers=2)
    assert _without_timings(_lines(out)) == _without_timings(reference)
    assert summary["n_images_done"] == len(QUERIES) and summary["processes"]["engine"] == "ray"
    # resume: three images lose their records; one worker redoes those and touches nothing else
    for image in sorted((out / "records").iterdir())[:3]:
        for path in image.iterdir():
            path.unlink()
    kept = {str(p): p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    again = run_explainer_ray(make_explainer, records, out, batch_size=3, num_workers=1)
    assert again["n_images_done"] == len(QUERIES)
    assert _without_timings(_lines(out)) == _without_timings(reference)
    assert {k: Path(k).stat().st_mtime_ns for k in kept} == kept
