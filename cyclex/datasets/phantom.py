"""The phantom world: procedural frontal chest radiographs whose findings, masks and reports are known.

A phantom is drawn from a seed: a patient's normal anatomy (body, lungs, mediastinum and spine,
heart, ribs, clavicles, diaphragm domes, gastric bubble, an "L" laterality marker), then its
findings, a mild blur, a per-patient exposure curve and a little Gaussian noise. Every random choice
comes from its own stream of `numpy.random.SeedSequence([seed, stream])`, so the same seed always
gives the same phantom and forcing a different set of findings leaves anatomy, noise and the other
findings untouched.

Masks are exact by construction: the noise-free image is rendered once with all findings and once
without each one; a finding's mask is every pixel where the two differ by at least
`mask_min_change` (half an 8-bit grey level by default). Smaller changes, the far tails of the blur,
vanish when the image is stored as 8-bit and no explanation can see them; on the 200 benchmark
phantoms they were 22 % of the exact-difference mask pixels. Pixels outside the mask change by less than
`mask_min_change` with and without the finding (tests check this on the final images); 0 gives the
exact-difference masks. A finding hidden under the shortcut marker loses those pixels from its mask.

Sides are the patient's ("left pleural effusion" is on the image right, as on a PA film).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from cyclex.atomic_io import write_bytes_atomic as _atomic_write_bytes
from cyclex.datasets.phantom_anatomy import build_anatomy
from cyclex.datasets.phantom_attributes import (
    PatientAttributes,
    anatomy_effects,
    finding_rates,
    sample_attributes,
)
from cyclex.datasets.phantom_findings import DEVICES, DRAWABLE, FINDING_DRAWERS, SEVERITIES, SIDED
from cyclex.datasets.phantom_reports import HEDGEABLE, REPORT_STYLES, phantom_report
from cyclex.findings import FindingLabels, canonical_finding, finding_slug
from cyclex.jsonl import read_jsonl

logger = logging.getLogger(__name__)

# Stream ids of the per-seed random generators (one stream per kind of choice).
_ANATOMY, _PRESENCE, _NOISE, _REPORT, _EXPOSURE, _SHORTCUT, _SAMPLE, _DRAW, _ATTRIBUTES = range(1, 10)

# With normal_rate 0.25 and max_findings 3 these give overall rates of about 0.13-0.18 per finding.
DEFAULT_PREVALENCE: dict[str, float] = {
    "Enlarged Cardiomediastinum": 0.18,
    "Cardiomegaly": 0.22,
    "Lung Opacity": 0.18,
    "Lung Lesion": 0.18,
    "Edema": 0.18,
    "Consolidation": 0.18,
    "Atelectasis": 0.18,
    "Pneumothorax": 0.18,
    "Pleural Effusion": 0.22,
    "Fracture": 0.18,
    "Support Devices": 0.18,
}
MIN_SIZE, MAX_SIZE = 32, 512
_SEEDS_PER_SET = 1_000_000  # make_phantoms(n, seed) uses seeds seed * 1e6 + i: sets never overlap


@dataclass(frozen=True)
class ShortcutConfig:
    """A spurious marker (a bright square) that co-occurs with one finding.

    box = (x, y, w, h) as fractions of the image side; the marker replaces those pixels with
    `intensity`. It is drawn with probability `rate_with_finding` on phantoms that have `finding`
    (positive or uncertain) and `rate_without_finding` on the others.
    """

    finding: str = "Cardiomegaly"
    rate_with_finding: float = 0.9
    rate_without_finding: float = 0.0
    box: tuple[float, float, float, float] = (0.08, 0.08, 0.08, 0.08)
    intensity: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "finding", canonical_finding(self.finding))
        for name in ("rate_with_finding", "rate_without_finding", "intensity"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"ShortcutConfig.{name} must be in [0, 1], got {value!r}")
        box = tuple(float(v) for v in self.box)
        if len(box) != 4 or min(box) < 0 or box[2] <= 0 or box[3] <= 0 or box[0] + box[2] > 1 or box[1] + box[3] > 1:
            raise ValueError(f"ShortcutConfig.box must be (x, y, w, h) fractions inside the image, got {self.box!r}")
        object.__setattr__(self, "box", box)

    def pixel_box(self, size: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels, end-exclusive, at least 1 x 1."""
        x, y, w, h = self.box
        x0, y0 = int(round(x * size)), int(round(y * size))
        return x0, y0, max(x0 + 1, int(round((x + w) * size))), max(y0 + 1, int(round((y + h) * size)))

    @classmethod
    def parse(cls, spec: str) -> ShortcutConfig:
        """Parse the CLI form `FINDING:RATE[:x,y,w,h]`, e.g. `Cardiomegaly:0.9:0.08,0.08,0.08,0.08`."""
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"shortcut {spec!r} must look like FINDING:RATE or FINDING:RATE:x,y,w,h")
        try:
            rate = float(parts[1])
        except ValueError:
            raise ValueError(f"shortcut {spec!r}: RATE {parts[1]!r} is not a number") from None
        kwargs: dict = {"finding": parts[0], "rate_with_finding": rate}
        if len(parts) == 3:
            try:
                kwargs["box"] = tuple(float(v) for v in parts[2].split(","))
            except ValueError:
                raise ValueError(f"shortcut {spec!r}: box {parts[2]!r} must be four numbers x,y,w,h") from None
        return cls(**kwargs)


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that shapes a phantom set besides the seed."""

    size: int = 64  # image side in pixels (square)
    prevalence: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PREVALENCE))
    shortcut: ShortcutConfig | None = None
    noise_std: float = 0.015  # small, so a VAE can reconstruct at PSNR >= 25 dB
    # Share of normal phantoms. The others draw each finding with its prevalence, redrawing empty
    # sets, so a finding's overall rate is about prevalence * (1 - normal_rate) / (1 - P(empty draw)).
    # None: plain independent draws.
    normal_rate: float | None = 0.25
    max_findings: int = 3  # extra sampled findings are dropped at random
    uncertain_rate: float = 0.25  # chance that a MILD hedgeable finding is reported uncertain ("varied" only)
    report_style: str = "varied"  # "varied" or "canonical"
    blur_sigma: float = 0.45  # pixels at 64 px, scaled with size
    mask_min_change: float = 0.5 / 255  # a mask pixel changes by this much at least (module docstring)
    # Patient age and sex as causal parents of anatomy and findings (phantom_attributes.py). Off by
    # default: phantoms then stay bit-identical to those the shipped weights were trained on.
    attributes: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"PhantomConfig.size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {self.size!r}")
        prevalence = {}
        for name, rate in dict(self.prevalence).items():
            finding = canonical_finding(name)
            if finding not in DRAWABLE:
                raise ValueError(f"PhantomConfig.prevalence: {finding!r} cannot be drawn; drawable findings: {DRAWABLE}")
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(f"PhantomConfig.prevalence[{finding!r}] must be in [0, 1], got {rate!r}")
            prevalence[finding] = float(rate)
        object.__setattr__(self, "prevalence", prevalence)
        if self.report_style not in REPORT_STYLES:
            raise ValueError(f"PhantomConfig.report_style must be one of {REPORT_STYLES}, got {self.report_style!r}")
        if not 0.0 <= self.noise_std <= 0.2:
            raise ValueError(f"PhantomConfig.noise_std must be in [0, 0.2], got {self.noise_std!r}")
        if not 0.0 <= self.mask_min_change < 1.0:
            raise ValueError(f"PhantomConfig.mask_min_change must be in [0, 1), got {self.mask_min_change!r}")
        if self.max_findings < 0:
            raise ValueError(f"PhantomConfig.max_findings must be >= 0, got {self.max_findings!r}")
        if self.normal_rate is not None and not 0.0 <= self.normal_rate <= 1.0:
            raise ValueError(f"PhantomConfig.normal_rate must be in [0, 1] or None, got {self.normal_rate!r}")
        if not 0.0 <= self.uncertain_rate <= 1.0:
            raise ValueError(f"PhantomConfig.uncertain_rate must be in [0, 1], got {self.uncertain_rate!r}")


@dataclass
class Phantom:
    """One phantom radiograph with its ground truth.

    image: float32 (H, W) in [0, 1]. masks: bool (H, W) per present finding (canonical names).
    chest_box: (x0, y0, x1, y1) pixel box of the lung fields and heart, end-exclusive.
    """

    id: str
    image: np.ndarray
    masks: dict[str, np.ndarray]
    labels: FindingLabels
    report: str
    chest_box: tuple[int, int, int, int]
    shortcut: bool
    shortcut_mask: np.ndarray | None
    findings_meta: dict[str, dict]
    seed: int
    shortcut_box: tuple[int, int, int, int] | None = None
    attributes: dict | None = None  # {"age": years, "sex": "female" | "male"} with PhantomConfig.attributes


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *stream]))


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _validate_forced(finding: str, meta: Mapping) -> dict:
    if not isinstance(meta, Mapping):
        raise ValueError(f"findings[{finding!r}] must be a dict of options, got {type(meta).__name__}")
    allowed = {"severity", "side", "zone", "devices", "uncertain"}
    unknown = set(meta) - allowed
    if unknown:
        raise ValueError(f"findings[{finding!r}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "severity" in meta and meta["severity"] not in SEVERITIES and finding != "Support Devices":
        raise ValueError(f"findings[{finding!r}]['severity'] must be one of {SEVERITIES}, got {meta['severity']!r}")
    if "side" in meta and meta["side"] not in SIDED.get(finding, (None,)):
        raise ValueError(f"findings[{finding!r}]['side'] must be one of {SIDED.get(finding, (None,))}, got {meta['side']!r}")
    if "zone" in meta and meta["zone"] not in ("upper", "mid", "lower"):
        raise ValueError(f"findings[{finding!r}]['zone'] must be upper, mid or lower, got {meta['zone']!r}")
    if "devices" in meta and (not meta["devices"] or any(d not in DEVICES for d in meta["devices"])):
        raise ValueError(f"findings[{finding!r}]['devices'] must be a non-empty list from {DEVICES}, got {meta['devices']!r}")
    return dict(meta)


def _present_by_attributes(seed: int, config: PhantomConfig, attributes: PatientAttributes) -> list[str]:
    """Findings present under the attributes' rates, each decided by its own uniform draw of the seed.

    present iff u_f < rate_f(age, sex): the u_f are the findings' exogenous noise, so the same seed
    under do(age) or do(sex) gains or loses exactly the findings whose threshold moved past u_f.
    A normal draw comes first (normal_rate) and extra findings beyond max_findings are dropped by a
    fixed random priority, both also functions of the seed only.
    """
    rng = _rng(seed, _PRESENCE)
    normal_draw, draws, priority = rng.random(), rng.random(len(DRAWABLE)), rng.random(len(DRAWABLE))
    if config.normal_rate is not None and normal_draw < config.normal_rate:
        return []
    rates = finding_rates({f: config.prevalence.get(f, 0.0) for f in DRAWABLE}, attributes)
    present = [i for i, finding in enumerate(DRAWABLE) if draws[i] < rates[finding]]
    kept = sorted(sorted(present, key=lambda i: priority[i])[:config.max_findings])
    return [DRAWABLE[i] for i in kept]


def _choose_findings(seed: int, config: PhantomConfig, forced: Mapping[str, Mapping] | None,
                     attributes: PatientAttributes | None = None) -> dict[str, dict]:
    """Present findings -> meta (severity, side, ...), sampled or forced."""
    if forced is None and attributes is not None:
        requested: dict[str, dict] = {f: {} for f in _present_by_attributes(seed, config, attributes)}
    elif forced is None:
        rng = _rng(seed, _PRESENCE)
        rates = np.array([config.prevalence.get(f, 0.0) for f in DRAWABLE])
        present: list[str] = []
        if config.normal_rate is None or (rng.random() >= config.normal_rate and rates.sum() > 0):
            for _ in range(1000):  # with normal_rate set, an abnormal phantom has at least one finding
                present = [f for f, u, r in zip(DRAWABLE, rng.random(len(DRAWABLE)), rates, strict=True) if u < r]
                if present or config.normal_rate is None:
                    break
        if len(present) > config.max_findings:
            keep = set(rng.choice(len(present), size=config.max_findings, replace=False).tolist())
            present = [f for i, f in enumerate(present) if i in keep]
        requested = {f: {} for f in present}
    else:
        requested = {}
        for name, meta in forced.items():
            finding = canonical_finding(name)
            if finding not in DRAWABLE:
                raise ValueError(f"findings: {finding!r} cannot be drawn; drawable findings: {DRAWABLE}")
            requested[finding] = _validate_forced(finding, meta or {})
    chosen = {}
    for finding in DRAWABLE:
        if finding not in requested:
            continue
        rng = _rng(seed, _SAMPLE, DRAWABLE.index(finding))
        sampler, _ = FINDING_DRAWERS[finding]
        meta = sampler(rng)
        hedge_draw = rng.random()
        meta.update(requested[finding])
        if "uncertain" not in requested[finding]:
            meta["uncertain"] = bool(finding in HEDGEABLE and meta.get("severity") == "mild"
                                     and hedge_draw < config.uncertain_rate)
        meta["uncertain"] = bool(meta["uncertain"])
        if config.report_style == "canonical":
            meta["uncertain"] = False  # the canonical style never hedges
        chosen[finding] = meta
    return chosen


def _render(anatomy, findings: Mapping[str, dict], seed: int, exposure: tuple[float, float, float],
            blur_sigma: float) -> np.ndarray:
    """Noise-free image (float32, H x W) with the given findings drawn in vocabulary order."""
    image = anatomy.base.copy()
    for finding in DRAWABLE:
        if finding in findings:
            _, draw = FINDING_DRAWERS[finding]
            image = draw(image, anatomy, findings[finding], _rng(seed, _DRAW, DRAWABLE.index(finding)))
    if blur_sigma > 0:
        ksize = 2 * math.ceil(2 * blur_sigma) + 1
        image = cv2.GaussianBlur(image, (ksize, ksize), blur_sigma, borderType=cv2.BORDER_REFLECT)
    gamma, contrast, offset = exposure
    image = offset + contrast * np.clip(image, 0.0, 1.0) ** gamma
    return image.astype(np.float32)


def _patient_attributes(seed: int, config: PhantomConfig, forced: Mapping | None) -> PatientAttributes | None:
    if not config.attributes:
        if forced is not None:
            raise ValueError("make_phantom(attributes=...) needs PhantomConfig(attributes=True)")
        return None
    drawn = sample_attributes(_rng(seed, _ATTRIBUTES))
    return drawn if forced is None else drawn.replaced(forced)


def make_phantom(seed: int, config: PhantomConfig | None = None, findings: Mapping[str, Mapping] | None = None,
                 *, shortcut: bool | None = None, phantom_id: str | None = None,
                 attributes: Mapping | None = None) -> Phantom:
    """Draw one phantom.

    findings=None samples findings by `config.prevalence` (and, with config.attributes, the
    patient's age and sex); `findings={}` gives a normal phantom;
    `findings={"Cardiomegaly": {"severity": "moderate"}}` forces findings (unspecified options are
    sampled from the seed). `shortcut=True/False` forces the shortcut marker (needs config.shortcut).
    attributes: force age and / or sex (needs config.attributes), e.g. `{"age": 80}`; the others and
    every other random choice keep the seed's draws (see `do_attribute`).
    """
    seed = _check_seed(seed)
    config = config or PhantomConfig()
    size = config.size
    patient = _patient_attributes(seed, config, attributes)
    chosen = _choose_findings(seed, config, findings, patient)

    effects = anatomy_effects(patient) if patient is not None else None
    anatomy = build_anatomy(_rng(seed, _ANATOMY), size, effects)
    erng = _rng(seed, _EXPOSURE)
    exposure = (float(erng.uniform(0.85, 1.15)), float(erng.uniform(0.92, 1.08)), float(erng.uniform(-0.03, 0.03)))
    blur = config.blur_sigma * size / 64
    clean = _render(anatomy, chosen, seed, exposure, blur)
    masks = {}
    for finding in chosen:
        without = {f: m for f, m in chosen.items() if f != finding}
        change = np.abs(clean - _render(anatomy, without, seed, exposure, blur))
        masks[finding] = change >= config.mask_min_change if config.mask_min_change > 0 else change > 0

    report, labels = phantom_report(chosen, config.report_style, _rng(seed, _REPORT))

    has_marker, marker_mask, marker_box = False, None, None
    if shortcut is not None and config.shortcut is None:
        raise ValueError("make_phantom(shortcut=...) needs config.shortcut to say where the marker goes")
    if config.shortcut is not None:
        sc = config.shortcut
        rate = sc.rate_with_finding if sc.finding in labels.present(uncertain_as_present=True) else sc.rate_without_finding
        draw = _rng(seed, _SHORTCUT).random() < rate
        has_marker = bool(draw) if shortcut is None else bool(shortcut)
        if has_marker:
            marker_box = sc.pixel_box(size)
            x0, y0, x1, y1 = marker_box
            marker_mask = np.zeros((size, size), bool)
            marker_mask[y0:y1, x0:x1] = True
            clean = np.where(marker_mask, np.float32(sc.intensity), clean)
            masks = {f: m & ~marker_mask for f, m in masks.items()}

    noise = _rng(seed, _NOISE).normal(0.0, config.noise_std, (size, size)).astype(np.float32)
    image = np.clip(clean + noise, 0.0, 1.0).astype(np.float32)
    return Phantom(
        id=phantom_id or f"phantom-{seed}",
        image=image,
        masks=masks,
        labels=labels,
        report=report,
        chest_box=anatomy.chest_box,
        shortcut=has_marker,
        shortcut_mask=marker_mask,
        findings_meta={f: dict(m) for f, m in chosen.items()},
        seed=seed,
        shortcut_box=marker_box,
        attributes=patient.to_dict() if patient is not None else None,
    )


def phantom_seed(seed: int, index: int) -> int:
    """Seed of the index-th phantom of the set `make_phantoms(n, seed)`."""
    return _check_seed(seed) * _SEEDS_PER_SET + int(index)


def make_phantoms(n: int, seed: int, config: PhantomConfig | None = None) -> list[Phantom]:
    """n phantoms, deterministic in (n, seed, config); phantom i uses `phantom_seed(seed, i)`."""
    if not isinstance(n, int) or not 0 <= n <= _SEEDS_PER_SET:
        raise ValueError(f"n must be an int in [0, {_SEEDS_PER_SET}], got {n!r}")
    seed = _check_seed(seed)
    out = []
    for i in range(n):
        s = phantom_seed(seed, i)
        out.append(make_phantom(s, config, phantom_id=f"phantom-{s:09d}"))
    return out


# --- folders -----------------------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError("OpenCV could not encode a PNG")
    return buf.tobytes()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255] with rounding."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _safe_id(phantom_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in phantom_id).strip(".")
    if not safe:
        raise ValueError(f"phantom id {phantom_id!r} gives an empty file name")
    return safe


def phantom_record(phantom: Phantom, image_path: str, mask_paths: dict[str, str], shortcut_path: str | None) -> dict:
    """The JSON metadata record of one phantom (paths relative to the folder)."""
    return {
        "id": phantom.id,
        "image": image_path,
        "report": phantom.report,
        "labels": phantom.labels.to_dict(),
        "masks": mask_paths,
        "chest_box": list(phantom.chest_box),
        "shortcut": phantom.shortcut,
        "shortcut_box": list(phantom.shortcut_box) if phantom.shortcut_box else None,
        "shortcut_mask": shortcut_path,
        "findings_meta": phantom.findings_meta,
        "seed": phantom.seed,
        "size": int(phantom.image.shape[0]),
        # only with attributes on, so metadata written before attributes existed stays byte-identical
        **({"attributes": phantom.attributes} if phantom.attributes is not None else {}),
    }


def write_phantom_folder(phantoms: Sequence[Phantom], out_dir: str | os.PathLike) -> Path:
    """Write images/ID.png (8-bit), masks/ID__slug.png (0/255) and metadata.jsonl; returns out_dir.

    metadata.jsonl has one JSON object per phantom (see `phantom_record`) and is written last and
    atomically, so a folder with a metadata file is complete.
    """
    out = Path(out_dir)
    seen: set[str] = set()
    records = []
    for phantom in phantoms:
        name = _safe_id(phantom.id)
        if name in seen:
            raise ValueError(f"two phantoms share the id {phantom.id!r}; ids must be unique in a folder")
        seen.add(name)
        image_rel = f"images/{name}.png"
        _atomic_write_bytes(out / image_rel, _png_bytes(to_uint8(phantom.image)))
        mask_paths = {}
        for finding, mask in phantom.masks.items():
            rel = f"masks/{name}__{finding_slug(finding)}.png"
            _atomic_write_bytes(out / rel, _png_bytes(mask.astype(np.uint8) * 255))
            mask_paths[finding] = rel
        shortcut_rel = None
        if phantom.shortcut_mask is not None:
            shortcut_rel = f"masks/{name}__shortcut.png"
            _atomic_write_bytes(out / shortcut_rel, _png_bytes(phantom.shortcut_mask.astype(np.uint8) * 255))
        records.append(phantom_record(phantom, image_rel, mask_paths, shortcut_rel))
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    _atomic_write_bytes(out / "metadata.jsonl", text.encode("utf-8"))
    logger.info("wrote %d phantoms to %s", len(records), out)
    return out


def read_phantom_folder(folder: str | os.PathLike) -> list[dict]:
    """Metadata records of a phantom folder with `image`, `masks` and `shortcut_mask` as absolute paths."""
    root = Path(folder)
    meta_path = root / "metadata.jsonl"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a phantom folder (expected metadata.jsonl)")
    records = read_jsonl(meta_path, ("id", "image", "report", "labels", "masks"))
    for record in records:
        record["image"] = str((root / record["image"]).resolve())
        record["masks"] = {f: str((root / p).resolve()) for f, p in record["masks"].items()}
        if record.get("shortcut_mask"):
            record["shortcut_mask"] = str((root / record["shortcut_mask"]).resolve())
    return records


def without_finding(phantom: Phantom, finding: str, config: PhantomConfig | None = None) -> Phantom:
    """The same patient drawn without `finding` (ground-truth counterfactual; other findings kept).

    Pass the config the phantom was made with; None means the defaults at the phantom's size.
    """
    finding = canonical_finding(finding)
    size = int(phantom.image.shape[0])
    config = config or PhantomConfig(size=size)
    if config.size != size:
        raise ValueError(f"config.size {config.size} differs from phantom {phantom.id}'s size {size}")
    if finding not in phantom.findings_meta:
        raise ValueError(f"phantom {phantom.id} has no {finding!r}; present: {sorted(phantom.findings_meta)}")
    kept = {f: m for f, m in phantom.findings_meta.items() if f != finding}
    forced_marker = phantom.shortcut if config.shortcut is not None else None
    return replace(make_phantom(phantom.seed, config, kept, shortcut=forced_marker, attributes=phantom.attributes),
                   id=phantom.id)


def do_attribute(phantom: Phantom, config: PhantomConfig, *, keep_findings: bool = False, **changes) -> Phantom:
    """The same patient under do(attribute = value): the world's true counterfactual (phantom_attributes.py).

    `do_attribute(p, config, age=80)` redraws p's seed with age forced to 80 and every exogenous draw
    kept. keep_findings=False (the total effect): the findings are re-decided by their own draws under
    the new age's rates, so some may appear or vanish; keep_findings=True (the direct effect): p's
    findings are held, only the anatomy changes. `config` must be the one p was made with.
    """
    if not config.attributes or phantom.attributes is None:
        raise ValueError(f"do_attribute: phantom {phantom.id} has no attributes; make it with PhantomConfig(attributes=True)")
    if not changes:
        raise ValueError("do_attribute needs at least one attribute to set, e.g. age=80 or sex='male'")
    if config.size != int(phantom.image.shape[0]):
        raise ValueError(f"config.size {config.size} differs from phantom {phantom.id}'s size {phantom.image.shape[0]}")
    forced = {**phantom.attributes, **changes}
    findings = phantom.findings_meta if keep_findings else None
    forced_marker = phantom.shortcut if config.shortcut is not None else None
    return replace(make_phantom(phantom.seed, config, findings, shortcut=forced_marker, attributes=forced), id=phantom.id)
