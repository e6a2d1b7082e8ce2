"""Findings drawn onto a phantom's anatomy, each made to stay visible at 64 x 64 pixels.

Every finding has two functions: `sample` draws its public description (severity, side, ...) that
goes into the metadata and the report, and `draw` paints it onto the image. Both use the finding's
own random stream, so adding or removing one finding never moves another; that is what lets
`phantom.py` compute exact masks by drawing with and without each finding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cyclex.datasets.phantom_anatomy import (
    BONE_ADD,
    HEART,
    MEDIASTINUM,
    Anatomy,
    LungShape,
    disc_coverage,
    draw_polyline,
    ellipse_points,
    fill_polygon,
    lerp,
)

SEVERITIES = ("mild", "moderate", "severe")
SIDES = ("left", "right")
DEVICES = ("pacemaker", "endotracheal tube", "central line", "nasogastric tube")

# Findings the phantom world can draw, in CheXbert order (Pneumonia and Pleural Other are not drawn).
DRAWABLE = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Fracture",
    "Support Devices",
)


def _severity(rng: np.random.Generator) -> str:
    return str(rng.choice(SEVERITIES, p=[0.4, 0.35, 0.25]))


def _side(rng: np.random.Generator, bilateral_rate: float = 0.0) -> str:
    if rng.random() < bilateral_rate:
        return "bilateral"
    return str(rng.choice(SIDES))


def _sides(meta: dict) -> tuple[str, ...]:
    return SIDES if meta["side"] == "bilateral" else (meta["side"],)


def _level(meta: dict, mild: float, moderate: float, severe: float) -> float:
    return {"mild": mild, "moderate": moderate, "severe": severe}[meta["severity"]]


def soft_blob(anatomy: Anatomy, centre_uv: tuple[float, float], sigma: tuple[float, float],
              angle_deg: float = 0.0) -> np.ndarray:
    """Gaussian-like blob in [0, 1] with compact support (exactly 0 beyond ~2.5 sigma).

    sigma is given as fractions of the image side along the blob's own axes.
    """
    tf = anatomy.tf
    size = tf.size
    cx, cy = tf.to_pixels(np.array([centre_uv]))[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    a = np.deg2rad(angle_deg + tf.rotation_deg)
    dx, dy = xs - cx, ys - cy
    along = dx * np.cos(a) + dy * np.sin(a)
    across = -dx * np.sin(a) + dy * np.cos(a)
    d2 = (along / tf.length(sigma[0])) ** 2 + (across / tf.length(sigma[1])) ** 2
    floor = np.exp(-0.5 * 2.5 ** 2)
    return np.clip((np.exp(-0.5 * d2) - floor) / (1 - floor), 0, 1).astype(np.float32)


# --- sampling ---------------------------------------------------------------------------------------

def _sample_cardiomegaly(rng):
    return {"severity": _severity(rng), "side": None}


def _sample_mediastinum(rng):
    return {"severity": _severity(rng), "side": None}


def _sample_opacity(rng):
    return {"severity": _severity(rng), "side": _side(rng, 0.15), "zone": str(rng.choice(["upper", "mid", "lower"]))}


def _sample_lesion(rng):
    return {"severity": _severity(rng), "side": _side(rng), "zone": str(rng.choice(["upper", "mid", "lower"]))}


def _sample_edema(rng):
    return {"severity": _severity(rng), "side": "bilateral"}


def _sample_consolidation(rng):
    return {"severity": _severity(rng), "side": _side(rng), "zone": str(rng.choice(["mid", "lower"], p=[0.3, 0.7]))}


def _sample_atelectasis(rng):
    return {"severity": _severity(rng), "side": _side(rng, 0.3)}


def _sample_pneumothorax(rng):
    return {"severity": _severity(rng), "side": _side(rng)}


def _sample_effusion(rng):
    return {"severity": _severity(rng), "side": _side(rng, 0.25)}


def _sample_fracture(rng):
    return {"severity": _severity(rng), "side": _side(rng)}


def _sample_devices(rng):
    first = str(rng.choice(DEVICES, p=[0.4, 0.25, 0.2, 0.15]))
    devices = [first]
    if rng.random() < 0.3:
        second = str(rng.choice([d for d in DEVICES if d != first]))
        devices.append(second)
    return {"severity": None, "side": None, "devices": sorted(devices, key=DEVICES.index)}


# --- drawing ----------------------------------------------------------------------------------------

def _draw_cardiomegaly(image, anatomy, meta, rng):
    grow = _level(meta, 1.25, 1.38, 1.52)
    enlarged = fill_polygon(anatomy.tf, anatomy.heart_points(scale_lateral=grow, scale_down=1 + (grow - 1) * 0.45))
    normal = fill_polygon(anatomy.tf, anatomy.heart_points())
    # Only the added heart area (and its anti-aliased border) changes.
    return lerp(image, HEART, np.clip(enlarged - normal, 0.0, 1.0))


def _draw_mediastinum(image, anatomy, meta, rng):
    widen = _level(meta, 0.05, 0.07, 0.09)
    top = anatomy.lungs["right"].apex[1] + 0.02
    bottom = anatomy.heart["v"] - anatomy.heart["b"] * 0.6
    v = np.linspace(top, bottom, 10)
    bulge = widen * np.sin(np.pi * np.linspace(0.15, 0.85, 10)) + 0.055
    outline = np.concatenate([np.stack([0.5 - bulge * 1.1, v], 1), np.stack([0.5 + bulge, v], 1)[::-1]])
    # The widened mediastinum encroaches on the lungs; trachea and heart stay as they were.
    lungs = np.maximum(anatomy.lung_visible["right"], anatomy.lung_visible["left"])
    return lerp(image, MEDIASTINUM + 0.03, fill_polygon(anatomy.tf, outline) * lungs)


def _zone_down(zone: str, rng) -> float:
    return {"upper": 0.25, "mid": 0.5, "lower": 0.75}[zone] + float(rng.uniform(-0.06, 0.06))


def _draw_opacity(image, anatomy, meta, rng):
    strength = _level(meta, 0.2, 0.26, 0.32)
    for side in _sides(meta):
        lung = anatomy.lungs[side]
        haze = np.zeros_like(image)
        down = _zone_down(meta["zone"], rng)
        for _ in range(3):
            centre = lung.point(float(rng.uniform(0.35, 0.75)), down + float(rng.uniform(-0.08, 0.08)))
            sig = float(rng.uniform(0.04, 0.06)) * _level(meta, 0.9, 1.1, 1.3)
            haze = np.maximum(haze, soft_blob(anatomy, centre, (sig, sig * 0.8), float(rng.uniform(0, 180))))
        image = image + strength * haze * anatomy.lung_visible[side]
    return image


def _draw_lesion(image, anatomy, meta, rng):
    lung = anatomy.lungs[meta["side"]]
    centre = lung.point(float(rng.uniform(0.35, 0.7)), _zone_down(meta["zone"], rng))
    radius = max(3.0 * anatomy.tf.size / 64, anatomy.tf.length(_level(meta, 0.05, 0.065, 0.085)))
    disc = disc_coverage(anatomy.tf, centre, radius)
    return lerp(image, 0.72, disc)


def _draw_edema(image, anatomy, meta, rng):
    strength = _level(meta, 0.2, 0.26, 0.32)
    for side in SIDES:
        lung = anatomy.lungs[side]
        centre = lung.point(0.3, 0.5)
        haze = soft_blob(anatomy, centre, (0.11, 0.16), float(rng.uniform(-15, 15)))
        # Kerley B lines: short horizontal lines at the lateral lung bases.
        for k in range(3):
            v = lung.costophrenic_v - 0.04 - 0.03 * k
            u0 = lung.point(1.0, 0.0)[0]
            du = 0.06 if side == "right" else -0.06
            haze = np.maximum(haze, 0.6 * draw_polyline(anatomy.tf, np.array([[u0 + du * 0.2, v], [u0 + du, v]]), 0.012))
        image = image + strength * haze * anatomy.lung_visible[side]
    return image


def _draw_consolidation(image, anatomy, meta, rng):
    lung = anatomy.lungs[meta["side"]]
    down = _zone_down(meta["zone"], rng)
    centre = lung.point(0.5, down)
    axes = (_level(meta, 0.07, 0.09, 0.11), _level(meta, 0.06, 0.075, 0.09))
    pts = ellipse_points(centre, axes, float(rng.uniform(-20, 20)), n=20)
    pts = pts + rng.normal(0, 0.008, pts.shape)
    region = fill_polygon(anatomy.tf, pts) * anatomy.lung_visible[meta["side"]]
    out = lerp(image, 0.58, region)
    # Air bronchograms: dark branching lines inside the dense region.
    branch = np.zeros_like(image)
    for _ in range(2):
        angle = rng.uniform(0, np.pi)
        d = np.array([np.cos(angle), np.sin(angle)]) * axes[0] * 0.7
        branch = np.maximum(branch, draw_polyline(anatomy.tf, np.array([np.array(centre) - d, np.array(centre) + d]), 0.012))
    return out - 0.12 * branch * region


def _draw_atelectasis(image, anatomy, meta, rng):
    thickness = _level(meta, 0.035, 0.045, 0.055)
    for side in _sides(meta):
        lung = anatomy.lungs[side]
        down = float(rng.uniform(0.68, 0.78))
        tilt = float(rng.uniform(-0.03, 0.03))
        a, b = lung.point(0.1, down), lung.point(0.9, down)
        band = draw_polyline(anatomy.tf, np.array([[a[0], a[1] + tilt], [b[0], b[1] - tilt]]), thickness)
        image = lerp(image, 0.55, band * anatomy.lung_visible[side])
    return image


def _collapsed_outline(lung: LungShape, factor: float) -> np.ndarray:
    """The lung's outline pulled towards its hilum by `factor` (1 = unchanged)."""
    hilum = np.array(lung.point(0.0, 0.9))
    return hilum + (lung.outline() - hilum) * factor


def _draw_pneumothorax(image, anatomy, meta, rng):
    side = meta["side"]
    lung = anatomy.lungs[side]
    factor = _level(meta, 0.8, 0.68, 0.55)
    collapsed_pts = _collapsed_outline(lung, factor)
    collapsed = fill_polygon(anatomy.tf, collapsed_pts)
    # Only the apical and lateral part collapses visibly: the lung base stays on the diaphragm.
    apex_v = lung.apex[1]
    keep = fill_polygon(anatomy.tf, np.array([[-0.5, apex_v - 0.3], [1.5, apex_v - 0.3],
                                              [1.5, lung.costophrenic_v - 0.1], [-0.5, lung.costophrenic_v - 0.1]]))
    lucent = anatomy.lung_visible[side] * (1 - collapsed) * keep
    out = lerp(image, 0.04, 0.9 * lucent)
    upper = collapsed_pts[collapsed_pts[:, 1] < lung.costophrenic_v - 0.1]
    pleural_line = draw_polyline(anatomy.tf, upper, 0.012) * anatomy.lung_visible[side] * keep
    return out + 0.16 * pleural_line


def _draw_effusion(image, anatomy, meta, rng):
    height = _level(meta, 0.22, 0.32, 0.45)
    for side in _sides(meta):
        lung = anatomy.lungs[side]
        lung_height = lung.costophrenic_v - lung.apex[1]
        level = lung.costophrenic_v - height * lung_height
        frac = np.linspace(0, 1, 16)  # 0 medial .. 1 lateral
        # Meniscus: the fluid climbs higher along the lateral chest wall.
        menisc_v = level + 0.06 * (1 - frac) ** 1.5 - 0.05 * frac ** 3
        u = np.array([lung.point(float(f) * 1.3 - 0.15, 0)[0] for f in frac])
        outline = np.concatenate([np.stack([u, menisc_v], 1), np.array([[u[-1], 1.3], [u[0], 1.3]])])
        fluid = fill_polygon(anatomy.tf, outline) * anatomy.lung_visible[side]
        image = lerp(image, 0.6, fluid)
    return image


def _draw_fracture(image, anatomy, meta, rng):
    side = meta["side"]
    ribs = anatomy.ribs[side]
    rib = ribs[int(rng.integers(2, min(7, len(ribs))))]
    s = float(rng.uniform(0.6, 0.8))
    idx = int(round(s * (len(rib) - 1)))
    tf = anatomy.tf
    lateral = rib[idx:]
    step = _level(meta, 0.018, 0.025, 0.032)
    # Displaced fragment: erase the lateral segment, redraw it shifted down, and add callus.
    old = draw_polyline(tf, lateral, anatomy.rib_thickness)
    new = draw_polyline(tf, lateral + np.array([0.0, step]), anatomy.rib_thickness)
    out = image - BONE_ADD * old + (BONE_ADD + 0.06) * new
    callus = disc_coverage(tf, tuple(rib[idx] + np.array([0.0, step / 2])), max(1.5, tf.length(0.028)))
    return lerp(out, 0.78, callus)


def _draw_devices(image, anatomy, meta, rng):
    tf = anatomy.tf
    metal = np.zeros_like(image)
    apex_v = anatomy.lungs["right"].apex[1]
    carina_v = apex_v + 0.17
    heart = anatomy.heart
    for device in meta["devices"]:
        if device == "pacemaker":
            box_c = (0.76, apex_v + 0.02)
            box = ellipse_points(box_c, (0.06, 0.04), 0, n=16)
            metal = np.maximum(metal, fill_polygon(tf, np.clip(box, -1, 2)))
            s = np.linspace(0, 1, 12)[:, None]
            target = np.array([heart["u"] + 0.02, heart["v"] + 0.03])
            start = np.array(box_c)
            lead = start + s * (target - start) + np.sin(np.pi * s) * np.array([-0.12, -0.02])
            metal = np.maximum(metal, draw_polyline(tf, lead, 0.018))
        elif device == "endotracheal tube":
            tube = np.array([[0.5, -0.1], [0.5, carina_v - 0.05]])
            metal = np.maximum(metal, draw_polyline(tf, tube, 0.03))
        elif device == "central line":
            s = np.linspace(0, 1, 12)
            u = 0.2 + 0.27 * s
            v = apex_v - 0.04 + 0.05 * s + 0.18 * s ** 3
            metal = np.maximum(metal, draw_polyline(tf, np.stack([u, v], 1), 0.02))
        elif device == "nasogastric tube":
            s = np.linspace(0, 1, 16)
            u = 0.505 + 0.12 * np.clip(s - 0.7, 0, None) / 0.3
            v = -0.1 + 1.0 * s
            metal = np.maximum(metal, draw_polyline(tf, np.stack([u, v], 1), 0.02))
        else:
            raise ValueError(f"unknown support device {device!r}; expected one of {DEVICES}")
    return lerp(image, 0.95, metal)


Sampler = Callable[[np.random.Generator], dict]
Drawer = Callable[[np.ndarray, Anatomy, dict, np.random.Generator], np.ndarray]

FINDING_DRAWERS: dict[str, tuple[Sampler, Drawer]] = {
    "Enlarged Cardiomediastinum": (_sample_mediastinum, _draw_mediastinum),
    "Cardiomegaly": (_sample_cardiomegaly, _draw_cardiomegaly),
    "Lung Opacity": (_sample_opacity, _draw_opacity),
    "Lung Lesion": (_sample_lesion, _draw_lesion),
    "Edema": (_sample_edema, _draw_edema),
    "Consolidation": (_sample_consolidation, _draw_consolidation),
    "Atelectasis": (_sample_atelectasis, _draw_atelectasis),
    "Pneumothorax": (_sample_pneumothorax, _draw_pneumothorax),
    "Pleural Effusion": (_sample_effusion, _draw_effusion),
    "Fracture": (_sample_fracture, _draw_fracture),
    "Support Devices": (_sample_devices, _draw_devices),
}
assert tuple(FINDING_DRAWERS) == DRAWABLE

# Findings that take a side, and which sides they accept.
SIDED = {
    "Lung Opacity": ("left", "right", "bilateral"),
    "Lung Lesion": ("left", "right"),
    "Edema": ("bilateral",),
    "Consolidation": ("left", "right"),
    "Atelectasis": ("left", "right", "bilateral"),
    "Pneumothorax": ("left", "right"),
    "Pleural Effusion": ("left", "right", "bilateral"),
    "Fracture": ("left", "right"),
}
