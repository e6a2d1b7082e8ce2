"""Typed settings of an explanation run: one dataclass per component, saved into the run folder.

`ExplainSettings` is what `cyclex explain` parses its options into and what `run_explain` takes, so
three lines of Python do what the command does::

    settings = ExplainSettings(guidance=1.0, checkpoint="final", frames=FrameSettings(normalize=True))
    run_explain(load_generator("demo:clean"), tailored_dir, "queries/", "runs/demo-clean", settings)

`FrameSettings` are the feature frame's and the difference maps' (seed 003 / seed 000 numbers from
`cyclex.explain.frames`); `SearchGrid` is seed 000's search grid (`cyclex.counterfactuals.search`
defaults). Each is frozen and validated on construction; `to_dict` gives the JSON the run folder keeps
in `explain_settings.json`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from cyclex.cycle.explainer import DIFFERENCE_REFERENCES
from cyclex.cycle.image_fit import check_fit_mode
from cyclex.explain.frames import DEFAULT_BLUR, DEFAULT_K, DEFAULT_THRESHOLD_CANDIDATES, check_kernel

# run_explain's flat keyword arguments for the frame settings -> FrameSettings fields
FLAT_FRAME_NAMES = {"frame_threshold": "threshold", "frame_k": "k", "frame_blur": "blur",
                    "frame_candidates": "candidates", "frame_normalize": "normalize",
                    "map_blur": "map_blur", "estimate_chest_boxes": "estimate_chest_boxes"}


@dataclass(frozen=True)
class FrameSettings:
    """How difference maps and feature frames are made (`CyclicExplainer`'s frame_* arguments)."""

    # L on 0-255, {finding: L} (calibrated per finding), or "stable": the most stable of `candidates` (seed 003)
    threshold: float | str | Mapping[str, float] = "stable"
    k: int = DEFAULT_K  # largest connected components kept in the frame
    blur: int = DEFAULT_BLUR  # Gaussian kernel smoothing |I - CF| before thresholding (odd)
    candidates: tuple[float, ...] = DEFAULT_THRESHOLD_CANDIDATES  # 95 +- 10, for threshold="stable"
    # stretch |I - CF| to a maximum of 255 before thresholding, so L is a share of the strongest change:
    # on the paper's absolute 0-255 scale an edit fainter than 85/255 (most of them) gives an empty frame
    normalize: bool = True
    map_blur: int = DEFAULT_BLUR  # Gaussian kernel smoothing the positive map (1 = seed 000's raw map)
    estimate_chest_boxes: bool = False  # mask maps to an Otsu chest box when the input gives none

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str):
            if self.threshold != "stable":
                raise ValueError(f"FrameSettings.threshold must be a number on 0-255 or 'stable', got {self.threshold!r}")
        elif isinstance(self.threshold, Mapping):
            per_finding = {str(k): float(v) for k, v in self.threshold.items()}
            bad = {k: v for k, v in per_finding.items() if not 0 <= v <= 255}
            if bad:
                raise ValueError(f"FrameSettings.threshold per finding must lie in [0, 255], got {bad}")
            object.__setattr__(self, "threshold", per_finding)
        elif not 0 <= float(self.threshold) <= 255:
            raise ValueError(f"FrameSettings.threshold must be in [0, 255], got {self.threshold}")
        if int(self.k) < 1:
            raise ValueError(f"FrameSettings.k must be >= 1, got {self.k}")
        check_kernel("FrameSettings.blur", self.blur)
        check_kernel("FrameSettings.map_blur", self.map_blur)
        object.__setattr__(self, "candidates", tuple(float(c) for c in self.candidates))

    def explainer_kwargs(self) -> dict[str, Any]:
        """The `CyclicExplainer` keyword arguments these settings stand for."""
        return {"frame_threshold": self.threshold, "frame_k": self.k, "frame_blur": self.blur,
                "frame_candidates": self.candidates, "frame_normalize": self.normalize,
                "map_blur": self.map_blur, "estimate_chest_boxes": self.estimate_chest_boxes}


def _default_search_value(name: str):
    # the search module owns its defaults; imported lazily so that listing settings stays light
    from cyclex.counterfactuals import search

    return getattr(search, name)


@dataclass(frozen=True)
class SearchGrid:
    """Seed 000's metric-guided search over inference settings (`SearchingMaker` keyword arguments).

    Empty grid dimensions (the defaults) take the search module's defaults.
    """

    checkpoints: tuple[str, ...] = ()
    null_settings: tuple[str, ...] = ()
    strengths: tuple[float, ...] = ()
    guidances: tuple[float, ...] = ()
    required_score: int = 5  # CF_Score (0-5) a counterfactual needs to be accepted
    order_by_paper_shares: bool = True  # try the settings seed 000 found most often successful first
    guidance_batch_size: int | None = None  # guidances per UNet batch (None: all at once)
    # (after_attempts, below_score): give up on a finding unless one of its first after_attempts attempts
    # reaches CF_Score below_score (`EarlyStopRule`; benchmarks/search.py fits one on validation seeds)
    early_stop: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        defaults = {"checkpoints": "DEFAULT_CHECKPOINTS", "null_settings": "DEFAULT_NULL_SETTINGS",
                    "strengths": "DEFAULT_STRENGTHS", "guidances": "DEFAULT_GUIDANCES"}
        for name, default in defaults.items():
            value = tuple(getattr(self, name)) or tuple(_default_search_value(default))
            if name in ("strengths", "guidances"):
                value = tuple(float(v) for v in value)
            object.__setattr__(self, name, value)
        if not 0 <= int(self.required_score) <= 5:
            raise ValueError(f"SearchGrid.required_score must be in 0-5 (CF_Score), got {self.required_score}")
        if any(not math.isfinite(g) or g < 0 for g in self.guidances):
            raise ValueError(f"SearchGrid.guidances must be finite numbers >= 0, got {self.guidances}")
        if any(not 0 < s <= 1 for s in self.strengths):
            raise ValueError(f"SearchGrid.strengths must lie in (0, 1], got {self.strengths}")
        if self.guidance_batch_size is not None and int(self.guidance_batch_size) < 1:
            raise ValueError(f"SearchGrid.guidance_batch_size must be >= 1 or None, got {self.guidance_batch_size}")
        if self.early_stop is not None:
            rule = tuple(self.early_stop)
            if (len(rule) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in rule)
                    or rule[0] < 1 or not 0 <= rule[1] <= 5):
                raise ValueError("SearchGrid.early_stop must be (after_attempts >= 1, below_score in 0-5) or None, "
                                 f"got {self.early_stop!r}")
            object.__setattr__(self, "early_stop", rule)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None) -> SearchGrid:
        """From `SearchingMaker`-style keyword arguments (unknown keys are an error naming them)."""
        kwargs = dict(kwargs or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown search settings {unknown}; expected some of {sorted(known)}")
        return cls(**kwargs)

    def maker_kwargs(self) -> dict[str, Any]:
        """`SearchingMaker.from_pretrained` keyword arguments."""
        return asdict(self)


@dataclass(frozen=True)
class ExplainSettings:
    """Everything `cyclex explain` sets about how a run explains (not which generator, data or folder)."""

    variant: str = "ddim"  # counterfactual maker (registered variant name)
    checkpoint: str = "best_psnr"  # tailored-SD checkpoint (unused with a search: it searches checkpoints)
    steps: int = 50  # DDIM steps T (seed 003)
    guidance: float = 7.5  # classifier-free guidance omega (seed 000: 7.5 .. 10)
    strength: float = 1.0  # denoising strength delta in (0, 1]
    findings: tuple[str, ...] | None = None  # only remove these findings (None: every present one)
    batch_size: int = 8  # images per engine batch
    image_size: int | None = None  # side queries are fitted to (None: the tailored SD's sample_size)
    resize: str = "pad"  # how: "pad" (keep the aspect ratio, pad), "crop" (keep it, centre-crop), "stretch", "none"
    difference_reference: str = "query"  # maps against the query (I - CF, the paper) or its redraw (R - CF)
    device: str | None = None  # torch device of the tailored SD
    frames: FrameSettings = field(default_factory=FrameSettings)
    search: SearchGrid | None = None  # None: one counterfactual per finding with the settings above

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise ValueError(f"ExplainSettings.steps must be >= 1, got {self.steps}")
        if not math.isfinite(float(self.guidance)) or float(self.guidance) < 0:  # NaN would pass a `< 0` test
            raise ValueError(f"ExplainSettings.guidance must be a finite number >= 0, got {self.guidance}")
        if not 0 < float(self.strength) <= 1:
            raise ValueError(f"ExplainSettings.strength (denoising strength delta) must be in (0, 1], got {self.strength}")
        if int(self.batch_size) < 1:
            raise ValueError(f"ExplainSettings.batch_size must be >= 1, got {self.batch_size}")
        if self.difference_reference not in DIFFERENCE_REFERENCES:
            raise ValueError(f"ExplainSettings.difference_reference must be one of {DIFFERENCE_REFERENCES}, "
                             f"got {self.difference_reference!r}")
        if self.image_size is not None and int(self.image_size) < 1:
            raise ValueError(f"ExplainSettings.image_size must be a positive side in pixels or None, got {self.image_size}")
        check_fit_mode(self.resize, name="ExplainSettings.resize")
        if self.findings is not None:
            object.__setattr__(self, "findings", tuple(self.findings) or None)
        if not isinstance(self.frames, FrameSettings):
            raise TypeError(f"ExplainSettings.frames must be a FrameSettings, got {type(self.frames).__name__}")
        if self.search is not None and not isinstance(self.search, SearchGrid):
            raise TypeError(f"ExplainSettings.search must be a SearchGrid or None, got {type(self.search).__name__}")

    # -- the flat keyword arguments `run_explain` has always taken --------------------------------
    def with_overrides(self, **overrides: Any) -> ExplainSettings:
        """A copy with flat overrides: any field name, the frame ones as `frame_threshold`, `frame_k`,
        `frame_blur`, `frame_candidates`, `frame_normalize`, `map_blur`, `estimate_chest_boxes`, and the
        search as `search=True|False` plus `search_kwargs={...}`."""
        overrides = dict(overrides)
        frame_changes = {FLAT_FRAME_NAMES[k]: overrides.pop(k) for k in list(overrides) if k in FLAT_FRAME_NAMES}
        search_on = overrides.pop("search", None)
        search_kwargs = overrides.pop("search_kwargs", None)
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown explain settings {unknown}")
        changed = replace(self, **overrides)
        if frame_changes:
            changed = replace(changed, frames=replace(changed.frames, **frame_changes))
        if search_on is False:
            if search_kwargs:
                raise ValueError("search_kwargs are settings of the search; pass search=True")
            changed = replace(changed, search=None)
        elif search_on or search_kwargs:
            if isinstance(search_kwargs, SearchGrid):
                grid = search_kwargs
            elif search_kwargs:
                grid = SearchGrid.from_kwargs(search_kwargs)
            else:
                grid = changed.search or SearchGrid()
            changed = replace(changed, search=grid)
        return changed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExplainSettings:
        """Inverse of `to_dict` (what `explain_settings.json` holds)."""
        data = dict(data)
        frames = FrameSettings(**data.pop("frames", {}) or {})
        search = data.pop("search", None)
        return cls(**data, frames=frames, search=SearchGrid(**search) if search else None)



__all__ = ["ExplainSettings", "FrameSettings", "SearchGrid"]
