"""CF_Score thresholds of the phantom demo, calibrated once and stored beside the demo models.

The phantom world has no CLIP or LPIPS weights, so the demo scores with stand-ins and calibrates
their thresholds once (the generic procedure: `cyclex.explain.cf_threshold_calibration`):
1. stand-in encoder: the penultimate features of the phantom classifier (trained on phantoms),
   used for both the "CLIP" cosine / L1 / L2 and the FET; LPIPS: the `lpips` package's architecture
   on the same stand-in features when no backbone weights exist (`StandInLPIPS`);
2. calibration pairs: phantoms and their ground-truth counterfactuals, which the phantom generator
   renders exactly (same seed, the finding removed) - something real data never offers;
3. `calibrate_cf_thresholds` keeps the quantiles admitting `COVERAGE` of them;
4. the result is written to `$CYCLEX_HOME/demo/cf_thresholds.json` (with seeds, n and coverage)
   and read back by later runs; `scripts/package_demo_weights.py` ships that file with the demo
   weights, and a fresh machine installs it instead of recalibrating.

Version 2 (`CALIBRATION_VERSION`): the counterfactual of each pair goes through the demo SDs' VAE
(encode, decode) first, when a demo SD is cached (base or tailored). Every counterfactual a tailored SD makes is a
VAE decoding, and the tiny demo VAE drops the phantoms' rib texture and noise, so version 1's
thresholds (both sides pixel-perfect) rejected even the best counterfactual the model can express.
The pair is now (phantom, best expressible counterfactual); the factual side stays the raw query, as
in every real comparison. A stored file of another version is recalibrated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from cyclex.datasets.seed_registry import CF_THRESHOLD_CALIBRATION
from cyclex.explain.cf_threshold_calibration import (
    calibrate_cf_thresholds,
    load_cf_thresholds,
    save_cf_thresholds,
)
from cyclex.explain.scores import CFThresholds, CounterfactualScorer

logger = logging.getLogger(__name__)

CALIBRATION_SEED = CF_THRESHOLD_CALIBRATION.set_seed
CALIBRATION_PAIRS = 64
# phantoms drawn at most per pair asked for (those without a finding are skipped); the registry reserves them all
CALIBRATION_DRAWS_PER_PAIR = CF_THRESHOLD_CALIBRATION.n // CALIBRATION_PAIRS
COVERAGE = 0.9
THRESHOLDS_NAME = "cf_thresholds.json"
CALIBRATION_VERSION = 2

Autoencoder = Callable[[torch.Tensor], torch.Tensor]


def demo_thresholds_path() -> Path:
    from cyclex.demo.cache import demo_cache_dir

    return demo_cache_dir() / THRESHOLDS_NAME


def demo_autoencoder() -> Autoencoder | None:
    """The demo SDs' VAE round trip ((B, 1, H, W) -> same, in [0, 1]); None when no demo SD is cached.

    Read from the demo base SD when it was built here, else from the cached `clean` tailored SD (as
    installed from the shipped weights on a fresh machine): every demo tailored SD keeps the base
    SD's VAE (tailored training updates the UNet only).
    """
    from cyclex.demo.base_sd import demo_base_sd_dir, demo_tailored_dir

    source = next((folder for folder in (demo_base_sd_dir(), demo_tailored_dir("clean"))
                   if (folder / "model_index.json").is_file()), None)
    if source is None:
        return None
    from cyclex.counterfactuals.diffusion import LatentDiffusion
    from cyclex.tailored_training import load_tailored_pipeline

    latent_diffusion = LatentDiffusion(load_tailored_pipeline(source, dtype=torch.float32), num_inference_steps=1)

    def round_trip(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return latent_diffusion.decode_latents(latent_diffusion.encode_images(images)).cpu()

    return round_trip


def calibration_values(scorer: CounterfactualScorer, n_pairs: int = CALIBRATION_PAIRS,
                       seed: int = CALIBRATION_SEED, autoencoder: Autoencoder | None = None,
                       ) -> tuple[dict[str, list[float]], list[int]]:
    """Raw metric values of true counterfactual pairs: a phantom and the same phantom without one finding
    (passed through `autoencoder` when given: the best counterfactual that model can express)."""
    from cyclex.datasets.phantom import make_phantom, phantom_seed

    values: dict[str, list[float]] = {}
    seeds: list[int] = []
    i = 0
    while len(seeds) < n_pairs and i < CALIBRATION_DRAWS_PER_PAIR * n_pairs:
        s = phantom_seed(seed, i)
        i += 1
        phantom = make_phantom(s)
        present = list(phantom.findings_meta)
        if not present:
            continue
        finding = present[0]
        kept = {k: dict(v) for k, v in phantom.findings_meta.items() if k != finding}
        truth = make_phantom(s, findings={finding: dict(phantom.findings_meta[finding]), **kept})
        removed = make_phantom(s, findings=kept)
        factual = torch.from_numpy(truth.image).float()[None, None]
        counterfactual = torch.from_numpy(removed.image).float()[None, None]
        if autoencoder is not None:
            counterfactual = autoencoder(counterfactual).float().clamp(0, 1)
        for key, tensor in scorer.raw_values(factual, counterfactual, finding).items():
            values.setdefault(key, []).append(float(tensor[0]))
        seeds.append(s)
    return values, seeds


def _stored_version(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("provenance", {}).get("version", 1))
    except (OSError, ValueError, AttributeError):
        return 0


def thresholds_for(scorer: CounterfactualScorer, path: str | Path | None,
                   autoencoder: Autoencoder | None = None) -> CFThresholds:
    """Read the stored calibration at `path`, or calibrate once with `scorer` and store it there.

    At the demo's own path (`demo_thresholds_path()`) a missing file is first installed from the
    shipped weights (`cyclex/demo/weights/cf_thresholds.json`), so a fresh machine does not recalibrate.

    A stored file of an older calibration version is recalibrated. autoencoder: the VAE round trip
    counterfactuals pass through (version 2); None: `demo_autoencoder()` when a demo SD is cached.
    """
    path = Path(path) if path is not None else None
    if path is not None and not path.is_file() and path == demo_thresholds_path():
        from cyclex.demo.packaged import install_packaged_assets

        install_packaged_assets()  # the shipped calibration: the same thresholds on every machine
    if path is not None and path.is_file() and _stored_version(path) == CALIBRATION_VERSION:
        return load_cf_thresholds(path)
    if autoencoder is None:
        autoencoder = demo_autoencoder()
    values, seeds = calibration_values(scorer, autoencoder=autoencoder)
    thresholds = calibrate_cf_thresholds(values, coverage=COVERAGE)
    if path is not None:
        save_cf_thresholds(path, thresholds, {
            "procedure": ("cyclex.explain.cf_threshold_calibration.calibrate_cf_thresholds on true phantom counterfactual pairs"
                          + (", counterfactual through the demo SDs' VAE" if autoencoder is not None else "")),
            "version": CALIBRATION_VERSION, "autoencoder": autoencoder is not None,
            "coverage": COVERAGE, "n_pairs": len(seeds), "seeds": seeds,
        })
        logger.info("calibrated demo CF thresholds on %d phantom pairs -> %s", len(seeds), path)
    return thresholds


def demo_scorer(classifier=None, thresholds_path: str | Path | None = None) -> CounterfactualScorer:
    """The phantom world's scorer: the phantom classifier as classifier and encoder, `StandInLPIPS` on
    its convolutions, thresholds from `thresholds_path` (default the demo's cf_thresholds.json,
    calibrated and stored when missing)."""
    from cyclex.explain.stand_in_lpips import StandInLPIPS

    if classifier is None:
        from cyclex.demo.phantom_classifier import load_phantom_classifier

        classifier = load_phantom_classifier()
    scorer = CounterfactualScorer(classifier, classifier,
                                  lpips=StandInLPIPS(classifier.net, classifier.config.image_size))
    scorer.thresholds = thresholds_for(scorer, thresholds_path if thresholds_path is not None else demo_thresholds_path())
    return scorer
