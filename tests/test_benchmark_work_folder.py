"""Benchmarks start fresh; a resume is refused when the weights or the cyclex version changed (issue 16, item 5)."""

import json

import pytest

from benchmarks.work_folder import (
    FINGERPRINT_NAME,
    StaleResumeError,
    prepare_work_folder,
    weights_fingerprint,
)


def _models(tmp_path, content=b"weights"):
    folder = tmp_path / "models" / "tailored"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "unet.safetensors").write_bytes(content)
    (folder / "config.json").write_text("{}")  # not a weight file: not fingerprinted
    return folder


def test_fresh_by_default_and_resume_only_with_the_same_fingerprint(tmp_path):
    work = tmp_path / "work"
    fingerprint = weights_fingerprint([_models(tmp_path)])
    assert list(fingerprint["weights"]) == ["tailored/unet.safetensors"] and fingerprint["cyclex_version"]
    prepare_work_folder(work, fingerprint)
    (work / "earlier-run.txt").write_text("x")
    assert prepare_work_folder(work, fingerprint, resume=True) == work
    assert (work / "earlier-run.txt").is_file()  # same weights and version: kept
    prepare_work_folder(work, fingerprint)  # no --resume: from scratch
    assert not (work / "earlier-run.txt").exists()
    assert json.loads((work / FINGERPRINT_NAME).read_text())["weights"] == fingerprint["weights"]


def test_stale_resume_is_refused(tmp_path):
    work = tmp_path / "work"
    models = _models(tmp_path)
    prepare_work_folder(work, weights_fingerprint([models]))
    (work / "earlier-run.txt").write_text("x")
    retrained = weights_fingerprint([_models(tmp_path, b"other weights")])
    with pytest.raises(StaleResumeError, match="weights tailored/unet.safetensors: changed"):
        prepare_work_folder(work, retrained, resume=True)
    newer = {**weights_fingerprint([models]), "cyclex_version": "99.0"}
    with pytest.raises(StaleResumeError, match="cyclex version .* -> 99.0"):
        prepare_work_folder(work, newer, resume=True)
    assert (work / "earlier-run.txt").is_file()  # a refusal deletes nothing
    (work / FINGERPRINT_NAME).unlink()
    with pytest.raises(StaleResumeError, match="no fingerprint.json"):
        prepare_work_folder(work, retrained, resume=True)


def test_benchmarks_take_resume_not_fresh():
    import inspect

    from benchmarks import cycle, demo_guidance

    for module in (cycle, demo_guidance):
        source = inspect.getsource(module.main)
        assert '"--resume"' in source and '"--fresh"' not in source and "prepare_work_folder" in source
