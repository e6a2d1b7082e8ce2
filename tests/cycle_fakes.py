"""Test doubles for the cyclic engine: a generator whose answers are known from pixel brightness,
a keyword labeler and a maker that paints known regions (shared by test_cycle and test_run_folder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cyclex.adapters import CallableGenerator, GeneratorInfo
from cyclex.counterfactuals.base import CounterfactualMaker, CounterfactualOutput
from cyclex.findings import FindingLabels, LabelState, StructuredPrompt

SIZE = 32
# (y0, y1, x0, x1) regions the fake generator looks at
HEART = (10, 22, 10, 22)
EFFUSION = (24, 30, 2, 8)
EDEMA = (2, 8, 24, 30)


def region_mean(images: torch.Tensor, box) -> torch.Tensor:
    """Mean of a SIZE-pixel box, scaled to the images' side (the engine fits queries to the SD's side)."""
    scale = images.shape[-1] / SIZE
    y0, y1, x0, x1 = (round(v * scale) for v in box)
    return images[:, 0, y0:y1, x0:x1].mean(dim=(1, 2))


def brightness_reports(images: torch.Tensor) -> list[str]:
    """'cardiomegaly' iff the heart box is bright (> 0.5); 'possible ...' between 0.35 and 0.5."""
    reports = []
    for heart, effusion, edema in zip(region_mean(images, HEART), region_mean(images, EFFUSION),
                                      region_mean(images, EDEMA), strict=True):
        words = []
        if heart > 0.5:
            words.append("cardiomegaly")
        elif heart > 0.35:
            words.append("possible cardiomegaly")
        if effusion > 0.5:
            words.append("effusion")
        if edema > 0.5:
            words.append("edema")
        reports.append(", ".join(words) if words else "normal")
    return reports


def brightness_generator() -> CallableGenerator:
    return CallableGenerator(brightness_reports, GeneratorInfo(name="fake:brightness", channels=1))


class KeywordLabeler:
    """'possible X' -> uncertain, 'X' -> positive, else blank."""

    words = {"cardiomegaly": "Cardiomegaly", "effusion": "Pleural Effusion", "edema": "Edema"}

    def label(self, reports: Sequence[str]) -> list[FindingLabels]:
        out = []
        for report in reports:
            states = {}
            for part in report.split(", "):
                uncertain = part.startswith("possible ")
                name = self.words.get(part.removeprefix("possible "))
                if name:
                    states[name] = LabelState.UNCERTAIN if uncertain else LabelState.POSITIVE
            out.append(FindingLabels(states))
        return out


class PaintingMaker(CounterfactualMaker):
    """Darkens the region of every finding missing from the target prompt.

    effects: finding -> extra (box, value) paints applied when that finding is removed
    (to simulate collateral changes); ineffective: findings whose removal does nothing;
    heart_value: value painted into the heart box when Cardiomegaly is removed.
    """

    name = "painting"
    boxes = {"Cardiomegaly": HEART, "Pleural Effusion": EFFUSION, "Edema": EDEMA}

    def __init__(self, effects=None, ineffective=(), heart_value=0.1):
        self.effects = effects or {}
        self.ineffective = set(ineffective)
        self.heart_value = heart_value
        self.calls = 0
        self.requests = 0

    def make(self, images, source_prompts, target_prompts, *, masks=None, seed=0):
        self.check_request(images, source_prompts, target_prompts)
        self.calls += 1
        self.requests += images.shape[0]
        out = images.clone()
        for i, (src, tgt) in enumerate(zip(source_prompts, target_prompts, strict=True)):
            removed = set(StructuredPrompt.parse(src).findings) - set(StructuredPrompt.parse(tgt).findings)
            for finding in removed - self.ineffective:
                y0, y1, x0, x1 = self.boxes[finding]
                out[i, 0, y0:y1, x0:x1] = self.heart_value if finding == "Cardiomegaly" else 0.1
                for (b0, b1, c0, c1), value in self.effects.get(finding, []):
                    out[i, 0, b0:b1, c0:c1] = value
        return CounterfactualOutput(images=out, details=[{"variant": self.name, "seed": seed}] * images.shape[0])

    def settings(self):
        return {"variant": self.name}


def query(heart=0.9, effusion=0.1, edema=0.1, background=0.2) -> torch.Tensor:
    image = torch.full((1, SIZE, SIZE), background)
    for box, value in ((HEART, heart), (EFFUSION, effusion), (EDEMA, edema)):
        y0, y1, x0, x1 = box
        image[0, y0:y1, x0:x1] = value
    return image


def write_tiny_tailored(folder: Path) -> Path:
    """A tailored SD folder (`load_tailored_pipeline` reads it) of the tiny random demo-size pipeline."""
    import json

    from cyclex.demo.tiny_sd import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(folder)
    (folder / "cyclex_tailored.json").write_text(json.dumps(
        {"vocabulary": [], "prompt_template": "cvlm", "sample_size": 64, "uncertain_as_present": True}))
    return folder
