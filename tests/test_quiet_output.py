"""The CLI hides the model libraries' loading bars and advisory warnings unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from cycle_fakes import query, write_tiny_tailored
from PIL import Image

from cyclex.third_party_output import QUIET_ENVIRONMENT, quiet_third_party_output

TESTS = Path(__file__).parent


def _explain(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.uint8(query(0.9, 0.9)[0].numpy() * 255 + 0.5)).save(folder / "a.png")
    tailored = tmp_path / "sd"
    if not tailored.exists():
        write_tiny_tailored(tailored)
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    out = tmp_path / ("run-verbose" if flags else "run")
    args = [sys.executable, "-m", "cyclex", *flags, "explain", "--generator", "python:cycle_fakes:brightness_reports",
            "--tailored", str(tailored), "--images", str(folder), "--out", str(out), "--steps", "1",
            "--labeler", "python:cycle_fakes:KeywordLabeler", "--findings", "Cardiomegaly"]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def test_loading_bars_only_with_verbose(tmp_path):
    quiet = _explain(tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading pipeline components" not in quiet.stderr + quiet.stdout
    assert "Cyclic Rate" in quiet.stdout
    verbose = _explain(tmp_path, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "Loading pipeline components" in verbose.stderr + verbose.stdout


def test_a_variable_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")
    for name in QUIET_ENVIRONMENT:
        if name != "TQDM_DISABLE":
            monkeypatch.delenv(name, raising=False)
    changed = quiet_third_party_output()
    assert os.environ["TQDM_DISABLE"] == "0" and "TQDM_DISABLE" not in changed
    assert changed["DIFFUSERS_VERBOSITY"] == "error"


def test_ctrl_c_ends_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cyclex.cycle.run_folder as rf
    from cyclex.cli import app

    out = tmp_path / "run"
    (out / "records" / "a").mkdir(parents=True)
    (out / "records" / "a" / "_complete.json").write_text("{}")
    (out / "records" / "b").mkdir()  # started, not finished

    def interrupted_run(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rf, "run_explain", interrupted_run)
    monkeypatch.setattr("cyclex.specs.generators.load_generator", lambda spec: object())
    result = CliRunner().invoke(app, ["explain", "--generator", "fake", "--tailored", str(tmp_path),
                                      "--images", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 130
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted: 1 image finished" in lines[0] and "rerun the same command" in lines[0]
