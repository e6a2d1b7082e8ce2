"""Shared builders for the tailored-training tests: a tiny base SD folder and a tiny manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = ("The lung with no abnormalities", "The lung with abnormalities Cardiomegaly",
           "The lung with abnormalities Pleural Effusion")


def save_tiny_base(folder: Path, vae_channels: tuple[int, ...] = (32, 64, 64)) -> Path:
    from cyclex.demo.tiny_sd import TinySDConfig, tiny_sd_pipeline

    tiny_sd_pipeline(TinySDConfig(vae_block_out_channels=vae_channels)).save_pretrained(folder)
    return folder


def write_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    """Smooth blob images (a bright disc of varying radius on a dark background), 8-bit PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        image = 0.2 + 0.6 * (((xx - cx) ** 2 + (yy - cy) ** 2) < r**2)
        path = folder / f"img{i:03d}.png"
        Image.fromarray((image * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_manifest(folder: Path, n: int = 12, size: int = 32) -> Path:
    paths = write_images(folder / "images", n, size)
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as handle:
        for i, path in enumerate(paths):
            handle.write(json.dumps({"id": path.stem, "image": str(path), "prompt": PROMPTS[i % 3],
                                     "generated_prompt": PROMPTS[i % 3]}) + "\n")
    return manifest


def disc_reports(images):
    """A report generator for CLI tests: bright images get 'Cardiomegaly.', dark ones 'No acute process.'."""
    return ["Cardiomegaly." if float(x.mean()) > 0.35 else "No acute cardiopulmonary process." for x in images]


def dark_reports(images):
    """Another generator for CLI tests: says the same normal report for every image."""
    return ["No acute cardiopulmonary process." for _ in images]
