"""A `CounterfactualScorer` from the text specs `cyclex evaluate` takes (--classifier / --encoder / --lpips),
plus a thresholds file; used by `cyclex explain --search`.

"auto" picks the phantom world's stand-ins for the demo generators (phantom classifier as classifier
and encoder, `StandInLPIPS`, the demo's calibrated `cf_thresholds.json`) and seed 000's choices
otherwise (an XRV classifier, the classifier's features, AlexNet LPIPS, Table 2 thresholds).
"""

from __future__ import annotations

from pathlib import Path

from cyclex.explain.scores import CFThresholds, CounterfactualScorer


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
    demo: the generator is a phantom-world demo generator ('demo:clean' / 'demo:shortcut')."""
    from cyclex.explain.evaluate_run import load_classifier_spec, load_encoder_spec, load_lpips_spec

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
