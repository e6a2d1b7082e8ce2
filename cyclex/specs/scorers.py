"""Scorers from text specs: the --classifier / --encoder / --lpips / --thresholds options of
`cyclex evaluate` and `cyclex explain --search`.

- `load_classifier_spec`, `load_encoder_spec`, `load_lpips_spec`: one metric model per spec
  ('phantom[:DIR]', 'xrv:WEIGHTS[::PATH]', 'clip:PATH_OR_ID', 'alex[:PATH]', ...);
- `search_scorer_from_specs`: the search's `CounterfactualScorer` with its thresholds. "auto" picks
  the phantom world's stand-ins for the demo generators (phantom classifier as classifier and
  encoder, `StandInLPIPS`, the demo's calibrated `cf_thresholds.json`) and seed 000's choices
  otherwise (an XRV classifier, the classifier's features, AlexNet LPIPS, Table 2 thresholds);
- `is_demo_generator_spec`: whether a generator spec names a demo generator ('demo:clean').

This is the one place (with cli.py and `cyclex.demo`) where a spec may name the phantom world: the
metric core (`cyclex.explain`) and the makers take loaded scorers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cyclex.explain.effectiveness import Classifier
from cyclex.explain.faithfulness import ImageEncoder, LPIPSMetric
from cyclex.explain.scores import CFThresholds, CounterfactualScorer

logger = logging.getLogger(__name__)

__all__ = [
    "is_demo_generator_spec",
    "load_classifier_spec",
    "load_encoder_spec",
    "load_lpips_spec",
    "search_scorer_from_specs",
]

DEMO_GENERATOR_PREFIX = "demo:"


def is_demo_generator_spec(generator_spec: str) -> bool:
    """True for the phantom world's demo generators ('demo:clean', 'demo:shortcut')."""
    return str(generator_spec).startswith(DEMO_GENERATOR_PREFIX)


def load_classifier_spec(spec: str) -> Classifier | None:
    """'phantom[:DIR]' (demo classifier, trained when missing), 'xrv:WEIGHTS[::PATH]', or 'none'."""
    kind, _, rest = spec.partition(":")
    if kind == "none":
        return None
    if kind == "phantom":
        from cyclex.demo.phantom_classifier import load_phantom_classifier

        return load_phantom_classifier(rest or None)
    if kind == "xrv":
        from cyclex.explain.effectiveness import XRVClassifier

        weights, _, path = (rest or "densenet121-res224-all").partition("::")
        return XRVClassifier(weights, weights_path=path or None)
    raise ValueError(f"classifier spec must be 'phantom[:DIR]', 'xrv:WEIGHTS[::PATH]' or 'none', got {spec!r}")


def load_encoder_spec(spec: str, classifier: Classifier | None) -> ImageEncoder | None:
    """'classifier' (the classifier's own features), 'clip:PATH_OR_ID', 'xrv:WEIGHTS[::PATH]',
    'phantom[:DIR]' or 'none'."""
    kind, _, rest = spec.partition(":")
    if kind == "none":
        return None
    if kind == "classifier":
        if classifier is None or not hasattr(classifier, "encode"):
            raise ValueError("encoder 'classifier' needs a classifier with an encode() method; pass --encoder clip:PATH")
        return classifier  # type: ignore[return-value]
    if kind == "clip":
        from cyclex.explain.faithfulness import CLIPImageEncoder

        if not rest:
            raise ValueError("encoder spec 'clip:' needs a folder or hub id, e.g. clip:/models/clip-vit-base-patch32")
        return CLIPImageEncoder(rest)
    if kind in ("xrv", "phantom"):
        return load_classifier_spec(spec)  # type: ignore[return-value]
    raise ValueError(f"encoder spec must be 'classifier', 'clip:PATH', 'xrv:WEIGHTS[::PATH]', 'phantom[:DIR]' "
                     f"or 'none', got {spec!r}")


def load_lpips_spec(spec: str) -> LPIPSMetric | None:
    """'auto' (AlexNet from torch's cache when present, else none), 'alex' / 'vgg' [':PATH'], or 'none'."""
    from cyclex.explain.faithfulness import LPIPSWeightsMissingError

    kind, _, path = spec.partition(":")
    if kind == "none":
        return None
    if kind == "auto":
        try:
            return LPIPSMetric("alex")
        except LPIPSWeightsMissingError as error:
            logger.warning("LPIPS skipped (its criterion counts as failed): %s", error)
            return None
    return LPIPSMetric(kind, backbone_weights=path or None)


def search_scorer_from_specs(
    classifier: str = "auto",
    encoder: str = "auto",
    lpips: str = "auto",
    thresholds: str | Path | None = None,
    *,
    demo: bool = False,
) -> CounterfactualScorer:
    """classifier: 'auto' | 'phantom[:DIR]' | 'xrv:WEIGHTS[::PATH]'; encoder: 'auto' | 'classifier' |
    'clip:PATH_OR_ID' | 'xrv:...' | 'phantom[:DIR]'; lpips: 'auto' | 'alex[:PATH]' | 'vgg[:PATH]' |
    'stand-in' (LPIPS's formula on the classifier's convolutions) | 'none' (the LPIPS criterion then
    fails, so CF_Score 5 cannot be reached); thresholds: a cf_thresholds.json (`save_cf_thresholds`),
    default: the demo calibration when `demo`, else seed 000's Table 2.
    demo: the generator is a phantom-world demo generator (`is_demo_generator_spec`)."""
    classifier_spec = ("phantom" if demo else "xrv:densenet121-res224-all") if classifier == "auto" else classifier
    loaded_classifier = load_classifier_spec(classifier_spec)
    if loaded_classifier is None:
        raise ValueError("the search needs a classifier (CPG and FET are two of the five CF_Score criteria); "
                         "pass --classifier phantom or xrv:WEIGHTS")
    loaded_encoder = load_encoder_spec("classifier" if encoder == "auto" else encoder, loaded_classifier)
    if loaded_encoder is None:
        raise ValueError("the search needs an image encoder (the CLIP criterion); pass --encoder classifier or clip:PATH")
    lpips_kind = ("stand-in" if demo else "auto") if lpips == "auto" else lpips
    if lpips_kind == "stand-in":
        from cyclex.explain.stand_in_lpips import StandInLPIPS

        net = getattr(loaded_classifier, "net", None)
        size = getattr(getattr(loaded_classifier, "config", None), "image_size", 64)
        if net is None:
            raise ValueError("--lpips stand-in needs a classifier with a .net (the phantom classifier)")
        lpips_metric = StandInLPIPS(net, size)
    else:
        lpips_metric = load_lpips_spec(lpips_kind)
    scorer = CounterfactualScorer(loaded_encoder, loaded_classifier, lpips=lpips_metric)
    if thresholds is not None:
        from cyclex.explain.cf_threshold_calibration import load_cf_thresholds

        path = Path(thresholds)
        if not path.is_file():
            raise FileNotFoundError(f"--thresholds {path}: no such file (expected a cf_thresholds.json)")
        scorer.thresholds = load_cf_thresholds(path)
    elif demo:
        from cyclex.demo.cf_thresholds import demo_thresholds_path, thresholds_for

        scorer.thresholds = thresholds_for(scorer, demo_thresholds_path())
    else:
        scorer.thresholds = CFThresholds()
    return scorer
