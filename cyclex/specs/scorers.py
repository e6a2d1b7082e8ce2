"""Scorers from text specs: the --classifier / --encoder / --lpips / --thresholds options of
`cyclex evaluate` and `cyclex explain --search`.

- `resolve_scorer_specs`: what "auto" means. For a demo generator ('demo:clean') the phantom
  world's stand-ins (phantom classifier as classifier and encoder, `StandInLPIPS` on its
  convolutions); for any other generator the real scorers, when their weights are on this machine
  (torchxrayvision DenseNet-121 in xrv's cache, CLIP in the Hugging Face cache, LPIPS AlexNet in
  torch's cache). A missing one stops here, before anything heavy is loaded, with an error naming
  the flag to pass. 'none' is always allowed: that scorer's criteria are then reported unavailable.
- `load_classifier_spec`, `load_encoder_spec`, `load_lpips_spec`: one metric model per spec
  ('phantom[:DIR]', 'xrv:WEIGHTS[::PATH]', 'clip:PATH_OR_ID', 'alex[:PATH]', 'stand-in', ...); each
  loaded object carries `provenance` (name, weights file and its sha256, whether it is a stand-in).
- `load_thresholds_spec`: a cf_thresholds.json, the demo's calibration (demo generators) or seed
  000's Table 2, with where they come from; `criteria_not_applicable`: a threshold belongs to its
  scorer: Table 2's CLIP (0.92) and FET (4) thresholds apply to CLIP embeddings only, its LPIPS
  threshold (0.2) to real LPIPS only; with another scorer those criteria are "not applicable" unless
  a thresholds file calibrated for it is given (`scripts/calibrate_cf_thresholds.py` makes one).
- `load_scorers` does all of it; `search_scorer_from_specs` gives the search its `CounterfactualScorer`;
  `is_demo_generator_spec`: whether a generator spec names a demo generator.

This is the one place (with cli.py and `cyclex.demo`) where a spec may name the phantom world: the
metric core (`cyclex.explain`) and the makers take loaded scorers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cyclex.explain.effectiveness import Classifier
from cyclex.explain.faithfulness import ImageEncoder, LPIPSMetric
from cyclex.explain.scores import CRITERIA, CFThresholds, CounterfactualScorer
from cyclex.provenance import STAND_IN_ENCODER, STAND_IN_LPIPS, file_sha256, files_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "ScorerUnavailableError",
    "Scorers",
    "is_demo_generator_spec",
    "resolve_scorer_specs",
    "load_classifier_spec",
    "load_encoder_spec",
    "load_lpips_spec",
    "load_thresholds_spec",
    "criteria_not_applicable",
    "load_scorers",
    "search_scorer_from_specs",
    "TABLE2_THRESHOLDS_SOURCE",
]

DEMO_GENERATOR_PREFIX = "demo:"
DEFAULT_XRV_WEIGHTS = "densenet121-res224-all"
# xrv's file for the default weights (xrv.models.model_urls[...]["weights_url"]'s base name), so "auto"
# can look for it without importing torchxrayvision (seconds).
DEFAULT_XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
# CLIP checkpoints "auto" looks for in the Hugging Face cache, in this order.
CLIP_CANDIDATES = ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16", "openai/clip-vit-large-patch14")
TABLE2_THRESHOLDS_SOURCE = {
    "name": "seed 000 Table 2", "kind": "table2",
    "set_for": {"lpips": "LPIPS (AlexNet / VGG)", "clip": "cosine of CLIP image embeddings",
                "l2": "pixel RMSE in [0, 1]", "cpg": "the classifier's logits (any classifier)",
                "fet": "CPG and distances of CLIP image embeddings"},
}


class ScorerUnavailableError(ValueError):
    """A scorer the run needs is not on this machine; the message names the flag to pass."""


def is_demo_generator_spec(generator_spec: str) -> bool:
    """True for the phantom world's demo generators ('demo:clean', 'demo:shortcut')."""
    return str(generator_spec).startswith(DEMO_GENERATOR_PREFIX)


# -- where weights live (file checks only: nothing heavy is imported) ---------------------------------------
def _xrv_default_path() -> Path:
    return Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data"))) / DEFAULT_XRV_FILE


def _lpips_backbone_path(net: str, path: str | None = None) -> Path:
    from cyclex.explain.faithfulness import LPIPS_BACKBONE_FILES, torch_hub_checkpoint_dir

    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    return Path(path) if path else torch_hub_checkpoint_dir() / LPIPS_BACKBONE_FILES[net]


def _cached_clip() -> str | None:
    """The first of CLIP_CANDIDATES whose config is in the Hugging Face cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo_id in CLIP_CANDIDATES:
        found = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(found, str) and Path(found).is_file():
            return repo_id
    return None


def resolve_scorer_specs(classifier: str = "auto", encoder: str = "auto", lpips: str = "auto", *,
                         demo: bool = False) -> tuple[str, str, str]:
    """The (classifier, encoder, lpips) specs "auto" stands for; other specs are kept as given.

    demo: the generator is a demo generator: ('phantom', 'classifier', 'stand-in'). Otherwise the real
    scorers found on this machine; raises ScorerUnavailableError naming every missing one and its flag.
    """
    if demo:
        return (("phantom" if classifier == "auto" else classifier), ("classifier" if encoder == "auto" else encoder),
                ("stand-in" if lpips == "auto" else lpips))
    missing = []
    if classifier == "auto":
        if _xrv_default_path().is_file():
            classifier = f"xrv:{DEFAULT_XRV_WEIGHTS}"
        else:
            missing.append(f"CPG classifier: torchxrayvision {DEFAULT_XRV_WEIGHTS} not found at {_xrv_default_path()}; "
                           "pass --classifier xrv:WEIGHTS::PATH (or --classifier none: CPG and FET reported unavailable)")
    if encoder == "auto":
        found = _cached_clip()
        if found:
            encoder = f"clip:{found}"
        else:
            missing.append(f"CLIP encoder: none of {', '.join(CLIP_CANDIDATES)} in the Hugging Face cache; pass "
                           "--encoder clip:PATH_OR_ID (or --encoder classifier with --thresholds FILE calibrated for it, "
                           "or --encoder none: CLIP and FET reported unavailable)")
    if lpips == "auto":
        if _lpips_backbone_path("alex").is_file():
            lpips = "alex"
        else:
            missing.append(f"LPIPS: AlexNet weights not found at {_lpips_backbone_path('alex')}; pass --lpips alex:PATH "
                           "or vgg:PATH (or --lpips none: the LPIPS criterion reported unavailable)")
    if missing:
        raise ScorerUnavailableError("scorers for a non-demo generator are not on this machine (phantom stand-ins "
                                     "are used for demo generators only):\n  " + "\n  ".join(missing))
    return classifier, encoder, lpips


# -- loading one scorer ------------------------------------------------------------------------------------
def _sha(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def _phantom_classifier(folder: str):
    from cyclex.demo.phantom_classifier import load_phantom_classifier, phantom_classifier_dir

    # never trained here: an evaluation must not build the scorer it is measured with
    classifier = load_phantom_classifier(folder or None, train_if_missing=False)
    weights = (Path(folder) if folder else phantom_classifier_dir()) / "model.safetensors"
    classifier.provenance = {
        "name": "phantom classifier (stand-in: a 13-finding CNN trained on phantoms, not a chest X-ray classifier)",
        "kind": "phantom-classifier", "stand_in": True, "weights": str(weights), "weights_sha256": _sha(weights),
        "roles": {"clip_encoder": {"name": STAND_IN_ENCODER, "kind": "stand-in"}},
    }
    return classifier


def load_classifier_spec(spec: str) -> Classifier | None:
    """'phantom[:DIR]' (the demo's classifier, never trained here), 'xrv:WEIGHTS[::PATH]', or 'none'."""
    kind, _, rest = spec.partition(":")
    if kind == "none":
        return None
    if kind == "phantom":
        return _phantom_classifier(rest)
    if kind == "xrv":
        from cyclex.explain.effectiveness import XRVClassifier

        weights, _, path = (rest or DEFAULT_XRV_WEIGHTS).partition("::")
        classifier = XRVClassifier(weights, weights_path=path or None)
        if path:
            weights_file = Path(path)
        elif weights == DEFAULT_XRV_WEIGHTS:
            weights_file = _xrv_default_path()
        else:
            import torchxrayvision as xrv

            weights_file = Path(xrv.utils.get_cache_dir()) / os.path.basename(xrv.models.model_urls[weights]["weights_url"])
        classifier.provenance = {
            "name": f"torchxrayvision {weights}", "kind": "xrv", "stand_in": False, "weights": str(weights_file),
            "weights_sha256": _sha(weights_file),
            "roles": {"clip_encoder": {"name": f"torchxrayvision {weights} penultimate features (not CLIP)",
                                       "kind": "xrv-features"}},
        }
        return classifier
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
        encoder = CLIPImageEncoder(rest)
        folder = Path(rest)
        if not folder.is_dir():  # a hub id: the snapshot folder in the Hugging Face cache
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(rest, "config.json")
            folder = Path(found).parent if isinstance(found, str) else folder
        encoder.provenance = {"name": f"CLIP image encoder {rest}", "kind": "clip", "stand_in": False,
                              "weights": str(folder),
                              "weights_sha256": files_sha256([folder], root=folder) if folder.is_dir() else None}
        return encoder
    if kind in ("xrv", "phantom"):
        return load_classifier_spec(spec)  # type: ignore[return-value]
    raise ValueError(f"encoder spec must be 'classifier', 'clip:PATH', 'xrv:WEIGHTS[::PATH]', 'phantom[:DIR]' "
                     f"or 'none', got {spec!r}")


def load_lpips_spec(spec: str, classifier: Classifier | None = None) -> LPIPSMetric | None:
    """'alex' / 'vgg' [':PATH'] (torchvision backbone from torch's cache or PATH), 'stand-in' (LPIPS's
    formula on the phantom classifier's convolutions, `classifier` must be it) or 'none'.

    'auto' is resolved by `resolve_scorer_specs` first; here it means AlexNet, an error when missing.
    """
    kind, _, path = spec.partition(":")
    if kind == "none":
        return None
    if kind == "stand-in":
        from cyclex.explain.stand_in_lpips import StandInLPIPS

        net = getattr(classifier, "net", None)
        if net is None:
            raise ValueError("--lpips stand-in needs a classifier with a .net (the phantom classifier)")
        metric = StandInLPIPS(net, getattr(getattr(classifier, "config", None), "image_size", 64))
        carried = getattr(classifier, "provenance", {}) or {}
        metric.provenance = {"name": STAND_IN_LPIPS, "kind": "stand-in", "stand_in": True,
                             "network": "LPIPS eq. 1 with unit linear weights on the classifier's convolutions",
                             "weights": carried.get("weights"), "weights_sha256": carried.get("weights_sha256")}
        return metric
    net = "alex" if kind == "auto" else kind
    backbone = _lpips_backbone_path(net, path or None)
    metric = LPIPSMetric(net, backbone_weights=path or None)
    import lpips as lpips_package

    linear = Path(lpips_package.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    metric.provenance = {"name": f"LPIPS {net} (lpips linear layers v0.1)", "kind": "lpips", "stand_in": False,
                         "weights": str(backbone), "weights_sha256": _sha(backbone),
                         "linear_weights": str(linear), "linear_weights_sha256": _sha(linear)}
    return metric


# -- thresholds and what they apply to -----------------------------------------------------------------------
def _file_thresholds(path: Path) -> tuple[CFThresholds, dict]:
    from cyclex.explain.cf_threshold_calibration import load_cf_thresholds

    if not path.is_file():
        raise FileNotFoundError(f"--thresholds {path}: no such file (expected a cf_thresholds.json)")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--thresholds {path}: not a JSON file ({err}); expected a cf_thresholds.json") from None
    if not isinstance(stored, dict):
        raise ValueError(f"--thresholds {path}: expected a JSON object (a cf_thresholds.json), got "
                         f"{type(stored).__name__}")
    stored = stored.get("provenance", {})
    stored = {k: v for k, v in stored.items() if k != "seeds"} if isinstance(stored, dict) else {}
    return load_cf_thresholds(path), {"name": str(path), "kind": "file", "sha256": file_sha256(path),
                                      "stored_provenance": stored}


def load_thresholds_spec(thresholds: str | Path | None, *, demo: bool,
                         scorer: CounterfactualScorer | None = None) -> tuple[CFThresholds, dict]:
    """(thresholds, where they come from): a cf_thresholds.json; None: the demo's calibration when
    `demo` (calibrated with `scorer` and stored when missing), else seed 000's Table 2."""
    if thresholds is not None:
        return _file_thresholds(Path(thresholds))
    if demo:
        from cyclex.demo.cf_thresholds import demo_thresholds_path, thresholds_for

        path = demo_thresholds_path()
        if scorer is None:
            raise ValueError("load_thresholds_spec(demo=True) needs the scorer to calibrate the demo thresholds with")
        thresholds_for(scorer, path)  # installs the shipped file, or calibrates once
        loaded, source = _file_thresholds(path)
        return loaded, {**source, "set_for": "the phantom world's stand-ins (phantom classifier, stand-in LPIPS)"}
    return CFThresholds(), dict(TABLE2_THRESHOLDS_SOURCE)


def criteria_not_applicable(encoder: Any, lpips: Any, thresholds_source: dict) -> tuple[str, ...]:
    """CF_Score criteria whose threshold was not set for the scorer in use.

    Table 2 thresholds: 'clip' and 'fet' need a CLIP encoder, 'lpips' real LPIPS. A thresholds file
    belongs to the scorers it is given with (the user calibrated it for them).
    """
    if thresholds_source.get("kind") != "table2":
        return ()
    kind = lambda scorer, role: (getattr(scorer, "provenance", None) or {}).get("roles", {}).get(role, {}).get(  # noqa: E731
        "kind", (getattr(scorer, "provenance", None) or {}).get("kind"))
    not_applicable = set()
    if encoder is not None and kind(encoder, "clip_encoder") != "clip":
        not_applicable |= {"clip", "fet"}
    if lpips is not None and kind(lpips, "lpips") != "lpips":
        not_applicable.add("lpips")
    return tuple(name for name in CRITERIA if name in not_applicable)


# -- everything together ------------------------------------------------------------------------------------
@dataclass
class Scorers:
    """Loaded scorers with their thresholds, where those come from and the criteria they do not apply to."""

    classifier: Classifier | None
    encoder: ImageEncoder | None
    lpips: LPIPSMetric | None
    thresholds: CFThresholds
    thresholds_source: dict
    not_applicable: tuple[str, ...] = ()
    specs: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """What `CounterfactualScorer.describe` gives, for these scorers (None ones are named unavailable)."""
        from cyclex.provenance import describe_scorer

        def described(scorer, role, flag):
            return describe_scorer(scorer, role) or {"role": role, "name": None,
                                                     "note": f"not loaded ({flag} none): its criteria are unavailable"}

        from dataclasses import asdict

        return {"lpips": described(self.lpips, "lpips", "--lpips"),
                "clip_encoder": described(self.encoder, "clip_encoder", "--encoder"),
                "cpg_classifier": described(self.classifier, "cpg_classifier", "--classifier"),
                "thresholds": {**asdict(self.thresholds), "source": self.thresholds_source},
                "not_applicable": list(self.not_applicable), "specs": dict(self.specs)}


def load_scorers(classifier: str = "auto", encoder: str = "auto", lpips: str = "auto",
                 thresholds: str | Path | None = None, *, demo: bool = False) -> Scorers:
    """Resolve "auto" (`resolve_scorer_specs`), load each scorer and the thresholds, name what does not apply."""
    specs = resolve_scorer_specs(classifier, encoder, lpips, demo=demo)
    loaded_classifier = load_classifier_spec(specs[0])
    loaded_encoder = load_encoder_spec(specs[1], loaded_classifier)
    loaded_lpips = load_lpips_spec(specs[2], loaded_classifier)
    calibration_scorer = None
    if demo and thresholds is None:
        if loaded_classifier is None or loaded_encoder is None:
            raise ValueError("the demo's CF thresholds are calibrated with its classifier and encoder; "
                             "pass --thresholds FILE when --classifier / --encoder is none")
        calibration_scorer = CounterfactualScorer(loaded_encoder, loaded_classifier, lpips=loaded_lpips)
    values, source = load_thresholds_spec(thresholds, demo=demo, scorer=calibration_scorer)
    return Scorers(loaded_classifier, loaded_encoder, loaded_lpips, values, source,
                   criteria_not_applicable(loaded_encoder, loaded_lpips, source),
                   {"classifier": specs[0], "encoder": specs[1], "lpips": specs[2]})


def search_scorer_from_specs(
    classifier: str = "auto",
    encoder: str = "auto",
    lpips: str = "auto",
    thresholds: str | Path | None = None,
    *,
    demo: bool = False,
) -> CounterfactualScorer:
    """The search's `CounterfactualScorer`. classifier: 'auto' | 'phantom[:DIR]' | 'xrv:WEIGHTS[::PATH]';
    encoder: 'auto' | 'classifier' | 'clip:PATH_OR_ID' | 'xrv:...' | 'phantom[:DIR]'; lpips: 'auto' |
    'alex[:PATH]' | 'vgg[:PATH]' | 'stand-in' | 'none' (then the LPIPS criterion is unavailable and
    CF_Score 5 cannot be reached); thresholds: a cf_thresholds.json (`save_cf_thresholds`), default:
    the demo calibration when `demo`, else seed 000's Table 2 (whose CLIP and FET thresholds are not
    applicable to an encoder that is not CLIP). demo: the generator is a demo generator."""
    scorers = load_scorers(classifier, encoder, lpips, thresholds, demo=demo)
    if scorers.classifier is None:
        raise ValueError("the search needs a classifier (CPG and FET are two of the five CF_Score criteria); "
                         "pass --classifier phantom or xrv:WEIGHTS")
    if scorers.encoder is None:
        raise ValueError("the search needs an image encoder (the CLIP criterion); pass --encoder clip:PATH")
    if scorers.not_applicable:
        logger.warning("CF_Score criteria %s are not applicable (their Table 2 thresholds belong to other scorers): "
                       "no counterfactual can reach CF_Score 5; pass --thresholds FILE calibrated for these scorers",
                       ", ".join(scorers.not_applicable))
    return CounterfactualScorer(scorers.encoder, scorers.classifier, lpips=scorers.lpips, thresholds=scorers.thresholds,
                                not_applicable=scorers.not_applicable, thresholds_provenance=scorers.thresholds_source)
