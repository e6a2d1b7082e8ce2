"""Normal anatomy of a phantom frontal (PA) chest radiograph, drawn with OpenCV polygons.

Geometry lives in "patient coordinates" (u, v) in [0, 1] x [0, 1] with v pointing down, as on a
radiograph. A per-patient affine transform (scale, shift, small rotation) maps them to pixels, and
every shape (anatomy and findings alike) goes through the same transform, so masks stay pixel-exact.

Side convention: a PA film shows the patient's RIGHT on the IMAGE LEFT. `"right"` and `"left"`
always mean the patient's side, as in reports; `image_x_sign(side)` converts.

Intensities are X-ray brightness in [0, 1]: air dark, soft tissue mid grey, bone and metal bright.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cyclex.datasets.phantom_attributes import AnatomyEffects

# Sub-pixel precision for cv2 drawing (coordinates are multiplied by 2**_SHIFT).
_SHIFT = 4
_SCALE = float(1 << _SHIFT)

# Brightness of the tissues (before the per-patient exposure curve).
AIR_OUTSIDE = 0.05
SOFT_TISSUE = 0.50
LUNG = 0.17
HEART = 0.62
MEDIASTINUM = 0.56
BONE_ADD = 0.10
CLAVICLE_ADD = 0.16
MARKER = 0.97


def image_x_sign(side: str) -> float:
    """-1 for the patient's right (image left), +1 for the patient's left (image right)."""
    if side == "right":
        return -1.0
    if side == "left":
        return 1.0
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


@dataclass
class PatientTransform:
    """Affine map from patient coordinates (u, v) to pixel coordinates (x, y)."""

    size: int
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    rotation_deg: float = 0.0
    matrix: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        theta = np.deg2rad(self.rotation_deg)
        c, s = np.cos(theta) * self.scale, np.sin(theta) * self.scale
        # Rotate and scale about the image centre (0.5, 0.5), then shift; all in pixels.
        centre = 0.5 * self.size
        linear = np.array([[c, -s], [s, c]]) * self.size
        offset = np.array([centre + self.shift[0] * self.size, centre + self.shift[1] * self.size])
        offset = offset - linear @ np.array([0.5, 0.5])
        self.matrix = np.hstack([linear, offset[:, None]])

    def to_pixels(self, points_uv: np.ndarray) -> np.ndarray:
        """(N, 2) patient coordinates -> (N, 2) float pixel coordinates."""
        pts = np.asarray(points_uv, dtype=np.float64).reshape(-1, 2)
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2]

    def length(self, fraction: float) -> float:
        """A length given as a fraction of the image side, in pixels."""
        return fraction * self.size * self.scale


def _fixed(points_px: np.ndarray) -> np.ndarray:
    return np.round(points_px * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def fill_polygon(tf: PatientTransform, points_uv: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32, H x W) of a filled polygon."""
    canvas = np.zeros((tf.size, tf.size), np.uint8)
    cv2.fillPoly(canvas, [_fixed(tf.to_pixels(points_uv))], 255, lineType=cv2.LINE_AA, shift=_SHIFT)
    return canvas.astype(np.float32) / 255.0


def draw_polylines(tf: PatientTransform, lines_uv: list[np.ndarray], thickness_frac: float,
                   closed: bool = False) -> np.ndarray:
    """Anti-aliased coverage of polylines whose thickness is a fraction of the image side (>= 1 px)."""
    canvas = np.zeros((tf.size, tf.size), np.uint8)
    thickness = max(1, int(round(tf.length(thickness_frac))))
    cv2.polylines(canvas, [_fixed(tf.to_pixels(line)) for line in lines_uv], closed, 255, thickness=thickness,
                  lineType=cv2.LINE_AA, shift=_SHIFT)
    return canvas.astype(np.float32) / 255.0


def draw_polyline(tf: PatientTransform, points_uv: np.ndarray, thickness_frac: float, closed: bool = False) -> np.ndarray:
    """Coverage of one polyline (see `draw_polylines`)."""
    return draw_polylines(tf, [points_uv], thickness_frac, closed)


def ellipse_points(centre: tuple[float, float], axes: tuple[float, float], angle_deg: float = 0.0,
                   n: int = 48) -> np.ndarray:
    """(n, 2) points on an ellipse in patient coordinates."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = np.deg2rad(angle_deg)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack([centre[0] + x * np.cos(a) - y * np.sin(a), centre[1] + x * np.sin(a) + y * np.cos(a)], 1)


def disc_coverage(tf: PatientTransform, centre_uv: tuple[float, float], radius_px: float) -> np.ndarray:
    """Anti-aliased coverage of a disc with a radius given in pixels."""
    canvas = np.zeros((tf.size, tf.size), np.uint8)
    c = tf.to_pixels(np.array([centre_uv]))[0]
    cv2.circle(canvas, tuple(int(v) for v in np.round(c * _SCALE)), int(round(radius_px * _SCALE)), 255,
               thickness=-1, lineType=cv2.LINE_AA, shift=_SHIFT)
    return canvas.astype(np.float32) / 255.0


@dataclass
class LungShape:
    """Outline parameters of one lung in patient coordinates, given for the patient's right lung."""

    side: str
    apex: tuple[float, float]
    lateral_u: float
    medial_u: float
    costophrenic_v: float
    cardiophrenic_v: float
    dome_height: float

    def _u(self, u: np.ndarray | float) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        return u if self.side == "right" else 1.0 - u

    def outline(self, n: int = 24) -> np.ndarray:
        """Closed outline: apex -> lateral border -> diaphragm dome -> medial border."""
        t = np.linspace(0, 1, n)
        ax, ay = self.apex
        lat_u = ax + (self.lateral_u - ax) * (1 - (1 - t) ** 2.6)
        lat_v = ay + (self.costophrenic_v - ay) * t
        s = np.linspace(0, 1, n)[1:]
        dome_u = self.lateral_u + (self.medial_u - self.lateral_u) * s
        dome_v = self.costophrenic_v + (self.cardiophrenic_v - self.costophrenic_v) * s
        dome_v = dome_v - self.dome_height * np.sin(np.pi * s) ** 0.8
        m = np.linspace(0, 1, n)[1:-1]
        med_u = self.medial_u + (ax + 0.02 - self.medial_u) * m ** 2
        med_v = self.cardiophrenic_v + (ay + 0.02 - self.cardiophrenic_v) * m
        u = np.concatenate([lat_u, dome_u, med_u])
        v = np.concatenate([lat_v, dome_v, med_v])
        return np.stack([self._u(u), v], 1)

    def point(self, frac_lateral: float, frac_down: float) -> tuple[float, float]:
        """A point inside the lung: frac_lateral 0 = medial .. 1 = lateral, frac_down 0 = apex .. 1 = base."""
        v = self.apex[1] + (self.costophrenic_v - self.apex[1]) * frac_down
        u = self.medial_u + (self.lateral_u - self.medial_u) * frac_lateral
        return float(self._u(u)), float(v)

    def dome_v(self, frac_lateral: float) -> float:
        """Height of the diaphragm dome at a lateral fraction (0 medial .. 1 lateral)."""
        s = 1.0 - frac_lateral
        base = self.costophrenic_v + (self.cardiophrenic_v - self.costophrenic_v) * s
        return float(base - self.dome_height * np.sin(np.pi * s) ** 0.8)


@dataclass
class Anatomy:
    """One patient's normal anatomy: shape parameters, coverages, and the rendered base image."""

    tf: PatientTransform
    lungs: dict[str, LungShape]
    lung_cov: dict[str, np.ndarray]
    lung_visible: dict[str, np.ndarray]  # lung coverage minus what the heart hides
    heart: dict[str, float]
    ribs: dict[str, list[np.ndarray]]  # per side, rib centre lines in patient coordinates
    rib_thickness: float
    base: np.ndarray  # float32 (H, W), normal anatomy before findings and exposure
    chest_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of lungs and heart, end-exclusive

    def heart_points(self, scale_lateral: float = 1.0, scale_down: float = 1.0) -> np.ndarray:
        """Heart silhouette outline; scaling grows it towards the patient's left and down."""
        h = self.heart
        centre = (h["u"] + h["a"] * (scale_lateral - 1.0) * 0.7, h["v"] + h["b"] * (scale_down - 1.0) * 0.5)
        return ellipse_points(centre, (h["a"] * scale_lateral, h["b"] * scale_down), h["angle"])


def _rib_lines(rng: np.random.Generator, side: str, lung: LungShape, count: int) -> list[np.ndarray]:
    lines = []
    top = lung.apex[1] - 0.01
    spacing = (lung.costophrenic_v - top) / (count + 0.3)
    for i in range(count):
        v0 = top + spacing * (i + 0.2) + rng.normal(0, 0.004)
        s = np.linspace(0, 1, 14)
        # Posterior ribs leave the spine, rise slightly, then sweep laterally and down.
        u = 0.47 - (0.47 - (lung.lateral_u - 0.03)) * s
        v = v0 - 0.025 * np.sin(np.pi * s * 0.9) + 0.09 * s ** 2
        uu = u if side == "right" else 1.0 - u
        lines.append(np.stack([uu, v], 1))
    return lines


def draw_laterality_marker(size: int) -> np.ndarray:
    """Coverage of an "L" marker in the top-right corner, scaled with the image (not the patient)."""
    canvas = np.zeros((size, size), np.uint8)
    thickness = max(1, round(size / 64))
    x0, y0 = int(round(size * 0.86)), int(round(size * 0.04))
    height, width = max(4, round(size * 0.09)), max(3, round(size * 0.06))
    cv2.line(canvas, (x0, y0), (x0, y0 + height), 255, thickness)
    cv2.line(canvas, (x0, y0 + height), (x0 + width, y0 + height), 255, thickness)
    return canvas.astype(np.float32) / 255.0


def lerp(image: np.ndarray, value: float | np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend towards `value` with per-pixel weight alpha in [0, 1]."""
    return image + (value - image) * alpha


def build_anatomy(rng: np.random.Generator, size: int, effects: AnatomyEffects | None = None) -> Anatomy:
    """Sample one patient's anatomy and render its normal base image (float32, H x W).

    effects: what the patient's attributes change (`phantom_attributes.anatomy_effects`), applied to
    the drawn shapes after every random draw, so the same draws give the same patient at any age or
    sex; None (attributes off) runs the original expressions untouched.
    """
    tf = PatientTransform(
        size=size,
        scale=float(rng.uniform(0.9, 1.04)),
        shift=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
        rotation_deg=float(rng.uniform(-4.0, 4.0)),
    )
    lateral = float(rng.uniform(0.13, 0.17))
    apex_v = float(rng.uniform(0.15, 0.19))
    cp_v = float(rng.uniform(0.72, 0.78))
    if effects is not None:
        cp_v += effects.lung_height_shift
        lateral -= effects.lung_width_shift
    lungs = {
        "right": LungShape("right", (0.37, apex_v), lateral, 0.445, cp_v, cp_v - 0.03, float(rng.uniform(0.05, 0.08))),
        # The left hemidiaphragm sits a little lower; the heart hides the left medial lung.
        "left": LungShape("left", (0.37, apex_v + 0.005), lateral + rng.uniform(-0.01, 0.01), 0.455,
                          cp_v + 0.02, cp_v - 0.01, float(rng.uniform(0.04, 0.07))),
    }
    # The heart's apex points to the patient's left (image right) and down.
    heart = {"u": 0.565 + float(rng.uniform(-0.015, 0.015)), "v": cp_v - 0.15 + float(rng.uniform(-0.015, 0.015)),
             "a": float(rng.uniform(0.145, 0.165)), "b": float(rng.uniform(0.095, 0.11)),
             "angle": float(rng.uniform(15, 30))}
    if effects is not None:
        heart["a"] *= effects.heart_scale
        heart["b"] *= effects.heart_scale
    bone_add, clavicle_add = BONE_ADD, CLAVICLE_ADD
    if effects is not None:
        bone_add, clavicle_add = BONE_ADD * effects.bone_contrast, CLAVICLE_ADD * effects.bone_contrast

    body_uv = np.array([[0.40, -0.2], [0.60, -0.2], [0.61, 0.08], [0.80, 0.11], [0.92, 0.18], [0.97, 0.32],
                        [0.98, 1.2], [0.02, 1.2], [0.03, 0.32], [0.08, 0.18], [0.20, 0.11], [0.39, 0.08]])
    body = fill_polygon(tf, body_uv)
    image = np.full((size, size), AIR_OUTSIDE, np.float32)
    image = lerp(image, SOFT_TISSUE, body)

    lung_cov = {side: fill_polygon(tf, lung.outline()) for side, lung in lungs.items()}
    lungs_union = np.maximum(lung_cov["right"], lung_cov["left"])
    image = lerp(image, LUNG, lungs_union)

    # Vascular markings fan out from the hila, only visible inside the lungs.
    marking_lines = []
    for side in ("right", "left"):
        lung = lungs[side]
        hilum = lung.point(0.15, 0.45)
        for _ in range(6):
            angle = rng.uniform(-1.2, 1.2) + (np.pi if side == "right" else 0.0)
            length = rng.uniform(0.12, 0.22)
            s = np.linspace(0, 1, 6)[:, None]
            bend = rng.normal(0, 0.03)
            direction = np.array([np.cos(angle), np.sin(angle)])
            normal = np.array([-direction[1], direction[0]])
            pts = np.array(hilum) + s * length * direction + np.sin(np.pi * s) * bend * normal
            marking_lines.append(pts)
    image = image + 0.02 * draw_polylines(tf, marking_lines, 0.012) * lungs_union

    # Mediastinum and spine: a bright midline column; the trachea is an air column inside it.
    spine = fill_polygon(tf, np.array([[0.465, -0.2], [0.535, -0.2], [0.54, 1.2], [0.46, 1.2]]))
    image = lerp(image, MEDIASTINUM, spine * (1 - lungs_union))
    vertebrae = draw_polylines(tf, [np.array([[0.47, v], [0.53, v]]) for v in np.arange(0.05, 1.0, 0.07)], 0.01)
    image = image - 0.04 * vertebrae * spine
    carina_v = apex_v + 0.17
    trachea = fill_polygon(tf, np.array([[0.488, -0.2], [0.512, -0.2], [0.514, carina_v], [0.486, carina_v]]))
    image = lerp(image, 0.33, trachea * 0.8)

    heart_cov = fill_polygon(tf, ellipse_points((heart["u"], heart["v"]), (heart["a"], heart["b"]), heart["angle"]))
    image = lerp(image, HEART, heart_cov)
    knob = disc_coverage(tf, (0.56, apex_v + 0.12), tf.length(0.035))
    image = lerp(image, MEDIASTINUM, knob * 0.9)

    # Gastric air bubble under the left hemidiaphragm.
    left = lungs["left"]
    bubble = fill_polygon(tf, ellipse_points((left.point(0.5, 1.0)[0], left.dome_v(0.5) + 0.06), (0.05, 0.025)))
    image = lerp(image, 0.30, bubble * 0.7)

    rib_thickness = 0.024
    ribs = {side: _rib_lines(rng, side, lungs[side], 9) for side in ("right", "left")}
    rib_cov = draw_polylines(tf, ribs["right"] + ribs["left"], rib_thickness)
    # Ribs show best against the dark lungs; soft tissue and the heart wash them out.
    image = image + bone_add * rib_cov * body * (0.35 + 0.65 * lungs_union)

    s = np.linspace(0, 1, 10)
    u = 0.47 - 0.29 * s
    v = apex_v + 0.015 - 0.05 * s + 0.015 * np.sin(np.pi * s)
    clavicles = draw_polylines(tf, [np.stack([u, v], 1), np.stack([1 - u, v], 1)], 0.03)
    image = image + clavicle_add * clavicles

    image = lerp(image, MARKER, draw_laterality_marker(size))

    ys, xs = np.nonzero((lungs_union > 0.5) | (heart_cov > 0.5))
    chest_box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    lung_visible = {side: cov * (1.0 - heart_cov) for side, cov in lung_cov.items()}
    return Anatomy(tf=tf, lungs=lungs, lung_cov=lung_cov, lung_visible=lung_visible, heart=heart, ribs=ribs, rib_thickness=rib_thickness,
                   base=image.astype(np.float32), chest_box=chest_box)
