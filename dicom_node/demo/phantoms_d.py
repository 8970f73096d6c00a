"""Family D: a fourth, independently designed thyroid-scintigraphy phantom (reporting only).

Family D is never trained on. It exists to measure how a model trained on families A, B and C
copes with a generator whose habits it has never seen, so every step below was designed from the
clinical picture of a planar anterior Tc-99m / I-123 thyroid scan rather than from the other
generators. The contract (truth masks, meta keys, ``write_cases``) is the one of
:mod:`dicom_node.demo.phantoms`.

| aspect | family D |
| --- | --- |
| outline | each lobe a closed Catmull-Rom spline through 16 anatomically placed control |
| | points (blunt lower pole, pointed upper pole, straighter medial border, laterally |
| | bowed centre line, upper poles diverging), each jittered along the normal |
| isthmus | spline band between the lobes (absent 20 %, thin, broad), lower uptake of its |
| | own; a pyramidal finger rising from the isthmus in 15 % |
| edge profile | "rounded slab": thickness ``sqrt(1 - (1 - d/R)**2)`` within R (1.5-5 mm) of the |
| | outline, then a linear dome to the core; d = distance to the spline outline |
| uptake | per-lobe ratio, smooth plane-wave heterogeneity (patchy thyroiditis in 10 %); |
| | a hot nodule (autonomous adenoma) may suppress the rest of the gland |
| nodules | metaballs (1-4 Gaussian kernels thresholded at half), placed in lobe coordinates |
| | (inside / surface / pole); surface, pole and lobe-filling ones may bulge the |
| | outline; a cold one removes only its chord fraction of the gland thickness |
| | (small ones stay partly masked by tissue in front and behind), residual 0-40 % |
| blur | pinhole: aperture disc convolved with a Gaussian, plus a penetration halo; |
| | parallel: Gaussian core plus a 2-D Lorentzian tail, with I-123 a six-spoke |
| | septal-penetration star; always a broad Compton-scatter part (raised by a wrong |
| | energy window in 8 %); the deeper background layer blurred 1.3-1.8x more |
| background | the neck as an elliptical cylinder (chord-length tissue activity, widening to |
| | the shoulders and head), jugular blood pool, heart / aortic arch in wide fields |
| distractors | submandibular and parotid glands (soft super-Gaussians), mouth, a beaded |
| | oesophagus streak, markers (sternal notch, chin, lateral, a palpation marker |
| | over a nodule, a pen line source) |
| detector | pinhole cos**3 vignetting and a round cone field (dark corners); PMT-lattice |
| | non-uniformity; rarely a failing PMT (soft cold patch) |
| sampling | rendered 2x finer and binned for matrices <= 128; 25 % acquired at half the |
| | matrix and stored zoomed (bilinear) |
| counts | Poisson, total log-uniform 1e4-1.2e6; 12 % stored with an integer scale 2-4 |
| header | "Delphinus Imaging" "Lyra" cameras, own descriptions and protocol names, |
| | fictitious patient names, PatientID ``DEL-<anatomy_seed>`` |

Random streams: ``anatomy_seed`` feeds the patient (gland, nodules, salivary glands, neck, name),
``seed`` feeds the study (camera, tracer, blur, position, tilt, counts, distractor activity,
detector, header), so two seeds with one anatomy seed are the same patient imaged twice. All
geometry is drawn in millimetres and independent of the matrix: the 128 and 256 renderings of one
study show the same field of view, so the pixel spacing halves with the doubled matrix.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.demo.phantoms import NM_IMAGE_STORAGE, PhantomCase, write_planned_cases

__all__ = ["make_case", "write_cases"]

_UID_ROOT = "1.2.826.0.1.3680043.8.498."
_MANUFACTURER = "Delphinus Imaging"
Array = np.ndarray

# Stream salts: anatomy, study (image), header. Separate header stream so that adding a header
# field never changes an image.
_ANATOMY, _STUDY, _HEADER = 0xD1, 0xD2, 0xD3


# --------------------------------------------------------------------------- small geometry
def _catmull_rom(points: Array, per_segment: int = 14) -> Array:
    """Dense vertices of the closed uniform Catmull-Rom spline through ``points``."""
    p = np.asarray(points, dtype=float)
    n = len(p)
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(n):
        p0, p1, p2, p3 = p[i - 1], p[i], p[(i + 1) % n], p[(i + 2) % n]
        out.append(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
            )
        )
    return np.concatenate(out)


def _rotate(points: Array, angle: float, offset: Array) -> Array:
    c, s = math.cos(angle), math.sin(angle)
    pts = np.asarray(points, dtype=float)
    return (
        np.stack([c * pts[..., 0] - s * pts[..., 1], s * pts[..., 0] + c * pts[..., 1]], -1)
        + offset
    )


class _Grid:
    """Square pixel grid in image millimetres (x to the image right, y down, centre 0)."""

    def __init__(self, n: int, fov_mm: float) -> None:
        self.n = n
        self.sp = fov_mm / n
        self.fov = fov_mm
        self.axis = (np.arange(n) + 0.5) * self.sp - fov_mm / 2

    def window(self, lo: Array, hi: Array, margin: float) -> tuple[slice, slice]:
        """Index slices (rows, cols) covering the mm box [lo, hi] grown by margin."""

        def span(a: float, b: float) -> slice:
            i0 = int(math.floor((a - margin + self.fov / 2) / self.sp - 0.5))
            i1 = int(math.ceil((b + margin + self.fov / 2) / self.sp - 0.5)) + 1
            return slice(max(i0, 0), min(max(i1, 0), self.n))

        return span(lo[1], hi[1]), span(lo[0], hi[0])


def _polygon_fields(poly: Array, grid: _Grid, need_depth: bool) -> tuple[Array, Array]:
    """Inside mask and depth (mm from the outline, 0 outside) of a closed dense polygon."""
    inside = np.zeros((grid.n, grid.n), dtype=bool)
    depth = np.zeros((grid.n, grid.n), dtype=np.float32)
    rs, cs = grid.window(poly.min(0), poly.max(0), 1.0)
    if rs.stop <= rs.start or cs.stop <= cs.start:
        return inside, depth
    px, py = np.meshgrid(grid.axis[cs], grid.axis[rs])
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    local = np.zeros(px.shape, dtype=bool)
    # even-odd crossing rule, one edge at a time (vectorised over pixels)
    for a, b, c, d in zip(x1, y1, x2, y2, strict=True):
        if b == d:
            continue
        crosses = (b > py) != (d > py)
        xint = a + (py - b) * (c - a) / (d - b)
        local ^= crosses & (px < xint)
    inside[rs, cs] = local
    if need_depth and local.any():
        qx = px[local].astype(np.float32)
        qy = py[local].astype(np.float32)
        vx, vy = x1.astype(np.float32), y1.astype(np.float32)
        best = np.full(qx.shape, np.inf, dtype=np.float32)
        for k in range(0, len(vx), 64):  # the spline is dense (< 0.6 mm): vertex distance is enough
            dx = qx[:, None] - vx[None, k : k + 64]
            dy = qy[:, None] - vy[None, k : k + 64]
            best = np.minimum(best, (dx * dx + dy * dy).min(1))
        sub = np.zeros(px.shape, dtype=np.float32)
        sub[local] = np.sqrt(best)
        depth[rs, cs] = sub
    return inside, depth


def _densify(poly: Array, step_mm: float = 0.5) -> Array:
    """Resample a closed polygon so that no edge is longer than step_mm."""
    nxt = np.roll(poly, -1, 0)
    seg = np.hypot(*(nxt - poly).T)
    out = []
    for p, q, length in zip(poly, nxt, seg, strict=True):
        k = max(1, int(math.ceil(length / step_mm)))
        t = np.arange(k)[:, None] / k
        out.append(p + (q - p) * t)
    return np.concatenate(out)


def _metaball(balls: list[list[float]], grid: _Grid) -> tuple[Array, Array]:
    """Mask (field > 0.5) and chord profile (0 at the edge, ~1 at the core) of a metaball."""
    b = np.asarray(balls, dtype=float)
    reach = 3.0 * b[:, 2].max()
    rs, cs = grid.window(b[:, :2].min(0), b[:, :2].max(0), reach)
    mask = np.zeros((grid.n, grid.n), dtype=bool)
    prof = np.zeros((grid.n, grid.n), dtype=np.float32)
    if rs.stop <= rs.start or cs.stop <= cs.start:
        return mask, prof
    px, py = np.meshgrid(grid.axis[cs], grid.axis[rs])
    f = np.zeros(px.shape)
    for cx, cy, s in b:
        f += np.exp(-((px - cx) ** 2 + (py - cy) ** 2) / (2 * s * s))
    mask[rs, cs] = f > 0.5
    # a sphere's chord grows like sqrt(distance from the edge): the same on the field scale
    prof[rs, cs] = np.sqrt(np.clip((f - 0.5) / 0.45, 0.0, 1.0))
    return mask, prof


def _equivalent_diameter(balls: list[list[float]]) -> float:
    """Diameter of the disc with the metaball's area, on a 0.2 mm grid (matrix independent)."""
    b = np.asarray(balls, dtype=float)
    lo = b[:, :2].min(0) - 3 * b[:, 2].max()
    hi = b[:, :2].max(0) + 3 * b[:, 2].max()
    step = 0.2
    xs = np.arange(lo[0], hi[0], step)
    ys = np.arange(lo[1], hi[1], step)
    px, py = np.meshgrid(xs, ys)
    f = np.zeros(px.shape)
    for cx, cy, s in b:
        f += np.exp(-((px - cx) ** 2 + (py - cy) ** 2) / (2 * s * s))
    return float(2 * math.sqrt((f > 0.5).sum() * step * step / math.pi))


# --------------------------------------------------------------------------- the patient
def _lobe(rng: np.random.Generator, side: int, length: float, width: float, gap: float) -> dict:
    """One lobe in patient mm (origin at the isthmus, x to the image right, y to the feet).

    side -1 is the patient's right lobe (image left in an anterior view), +1 the left lobe.
    """
    tilt = math.radians(rng.uniform(4.0, 22.0))  # upper poles diverge laterally
    low = np.array([side * (gap / 2 + 0.5 * width), length * rng.uniform(0.22, 0.4)])
    axis = np.array([side * math.sin(tilt), -math.cos(tilt)])
    normal = np.array([side * math.cos(tilt), math.sin(tilt)])  # points laterally
    bow = rng.uniform(-1.5, 4.5)  # lateral bow of the centre line (lobes wrap the trachea)
    alpha, beta = rng.uniform(0.3, 0.6), rng.uniform(0.55, 1.0)  # blunt lower, pointed upper pole
    s_peak = alpha / (alpha + beta)
    g_max = s_peak**alpha * (1 - s_peak) ** beta
    lateral = rng.uniform(0.5, 0.62)  # share of the width lateral to the centre line
    return {
        "side": side,
        "low": low.tolist(),
        "axis": axis.tolist(),
        "normal": normal.tolist(),
        "length": length,
        "width": width,
        "bow": bow,
        "alpha": alpha,
        "beta": beta,
        "g_max": g_max,
        "lateral": lateral,
        "jitter": rng.normal(0.0, 0.05, size=16).clip(-0.12, 0.12).tolist(),
    }


def _lobe_point(lobe: dict, s: float, u: float) -> Array:
    """Point at fraction s (0 lower pole, 1 upper pole) and signed width fraction u of a lobe.

    u = +1 is the lateral outline, -1 the medial outline, 0 the centre line.
    """
    low, axis, normal = (np.asarray(lobe[k]) for k in ("low", "axis", "normal"))
    sc = min(max(s, 0.0), 1.0)
    g = (sc ** lobe["alpha"]) * ((1 - sc) ** lobe["beta"]) / lobe["g_max"]
    half = lobe["width"] * (lobe["lateral"] if u >= 0 else 1 - lobe["lateral"]) * g
    centre = low + axis * lobe["length"] * s + normal * lobe["bow"] * math.sin(math.pi * sc)
    return np.asarray(centre + normal * u * half)


def _lobe_outline(lobe: dict) -> Array:
    """Control points: lower tip, lateral border upward, upper tip, medial border downward."""
    stations = [0.05, 0.16, 0.3, 0.45, 0.6, 0.74, 0.86]
    jitter = lobe["jitter"]
    pts = [_lobe_point(lobe, -0.015, 0.0)]
    pts += [_lobe_point(lobe, s, 1.0 + jitter[i]) for i, s in enumerate(stations)]
    pts.append(_lobe_point(lobe, 1.01, 0.0))
    pts += [_lobe_point(lobe, s, -(1.0 + jitter[8 + i])) for i, s in enumerate(stations[::-1])]
    return np.asarray(pts)


def _nodule_balls(rng: np.random.Generator, centre: Array, diameter: float) -> list[list[float]]:
    """Metaball of one nodule: a main kernel plus 0-2 satellites (lobulated outline)."""
    s0 = diameter / 2.355  # one kernel thresholded at half its peak has this diameter
    # big nodules are rarely round: a smaller core with 1-3 comparable lobules (the measured
    # equivalent diameter, not the drawn one, goes into the meta)
    big = diameter > 16
    if big:
        s0 *= 0.78
    balls = [[float(centre[0]), float(centre[1]), s0]]
    for _ in range(int(rng.choice([1, 2, 3] if big else [0, 0, 1, 1, 2]))):
        ang = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.3, 0.5 if big else 0.4) * diameter
        balls.append(
            [
                float(centre[0] + dist * math.cos(ang)),
                float(centre[1] + dist * math.sin(ang)),
                s0 * rng.uniform(0.55, 0.85 if big else 0.7),
            ]
        )
    return balls


def _place_nodule(
    rng: np.random.Generator, lobe: dict, lobe_index: int, kind: str, size_class: str
) -> dict:
    width = lobe["width"]
    if size_class == "small":
        diameter = rng.uniform(4.0, 9.0)
    elif size_class == "medium":
        diameter = rng.uniform(9.0, 18.0)
    else:  # lobe-filling: as wide as the lobe or wider, always deforms it
        diameter = min(rng.uniform(0.85, 1.35) * width + 4.0, 42.0)
    location = str(rng.choice(["inside", "surface", "pole"], p=[0.4, 0.4, 0.2]))
    if size_class == "large":
        location = "surface"
        s, u = rng.uniform(0.3, 0.6), rng.uniform(-0.3, 0.5)
    elif location == "inside":
        s = rng.uniform(0.3, 0.7)
        room = max(0.0, 1.0 - 1.2 * diameter / width)
        u = rng.uniform(-room, room) * 0.8
        if diameter > 0.7 * width:  # an inner nodule must fit: shrink it into the lobe
            diameter = 0.7 * width
    elif location == "surface":
        s = rng.uniform(0.2, 0.8)
        sign = 1.0 if rng.random() < 0.65 else -1.0  # lateral border more often than medial
        u = sign * rng.uniform(0.7, 1.1)
    else:
        s = float(rng.choice([rng.uniform(0.0, 0.1), rng.uniform(0.9, 1.0)]))
        u = rng.uniform(-0.3, 0.3)
    centre = _lobe_point(lobe, s, u)
    balls = _nodule_balls(rng, centre, diameter)
    bulge = size_class == "large" or (location != "inside" and rng.random() < 0.55)
    node: dict[str, Any] = {
        "kind": kind,
        "lobe": lobe_index,
        "location": location,
        "size_class": size_class,
        "bulge": bool(bulge),
        "balls": balls,
        "diameter_mm": round(_equivalent_diameter(balls), 2),
    }
    if kind == "cold":
        node["residual"] = float(rng.uniform(0.0, 0.4))
        # fraction of the gland thickness the nodule replaces at its core: small nodules sit
        # inside thicker tissue and are partly masked by it
        node["occupancy"] = float(rng.uniform(0.85, 1.0) if diameter > 14 else rng.uniform(0.55, 1))
    else:
        node["uptake"] = float(rng.uniform(1.6, 4.0))
        node["occupancy"] = 1.0
    return node


def _centre_x_at(lobe: dict, y: float) -> float:
    """x of the lobe's centre line where it crosses height y (nearest station)."""
    centres = np.array([_lobe_point(lobe, s, 0.0) for s in np.linspace(0.0, 1.0, 101)])
    return float(centres[np.argmin(np.abs(centres[:, 1] - y)), 0])


def _apart(a: dict, b: dict) -> bool:
    """True when two nodules' main kernels are further apart than their radii."""
    (ax, ay, _), (bx, by, _) = a["balls"][0], b["balls"][0]
    return bool(math.hypot(ax - bx, ay - by) > 0.55 * (a["diameter_mm"] + b["diameter_mm"]))


def _anatomy(anatomy_seed: int) -> dict[str, Any]:
    rng = np.random.default_rng([anatomy_seed, _ANATOMY])
    habitus = str(rng.choice(["normal", "goitre", "small", "slender"], p=[0.6, 0.14, 0.12, 0.14]))
    length = rng.uniform(38.0, 60.0)
    width = rng.uniform(14.0, 25.0)
    if habitus == "goitre":
        length, width = length * rng.uniform(1.1, 1.3), width * rng.uniform(1.25, 1.5)
    elif habitus == "small":
        length, width = length * 0.8, width * 0.8
    elif habitus == "slender":
        length, width = length * 1.05, width * 0.75
    gap = rng.uniform(4.0, 14.0)  # between the lobes' medial borders at the isthmus
    lobes = [
        _lobe(rng, side, length * rng.uniform(0.85, 1.15), width * rng.uniform(0.8, 1.2), gap)
        for side in (-1, 1)
    ]
    uptakes = [1.0, float(rng.uniform(0.72, 1.28))]
    single_lobe = bool(rng.random() < 0.12)
    removed = int(rng.integers(2)) if single_lobe else -1
    isthmus_kind = str(rng.choice(["absent", "thin", "broad"], p=[0.2, 0.55, 0.25]))
    isthmus_h = {"absent": 0.0, "thin": rng.uniform(3.0, 8.0), "broad": rng.uniform(8.0, 18.0)}[
        isthmus_kind
    ]
    isthmus = None
    pyramidal = None
    if isthmus_kind != "absent" and not single_lobe:
        yc, sag = rng.uniform(-3.0, 3.0), rng.uniform(-2.0, 3.0)
        # the band ends on each lobe's centre line at its own height, so its ends stay hidden
        # in the lobes whatever their tilt and bow
        xr, xl = (_centre_x_at(lobe, yc) for lobe in lobes)
        isthmus = {
            "points": [
                [xr, yc - isthmus_h / 2],
                [0.0, yc - isthmus_h / 2 + sag],
                [xl, yc - isthmus_h / 2],
                [xl, yc + isthmus_h / 2],
                [0.0, yc + isthmus_h / 2 + sag * 0.5],
                [xr, yc + isthmus_h / 2],
            ],
            "uptake": float(rng.uniform(0.45, 0.8)),
        }
        if rng.random() < 0.15:
            x0 = rng.uniform(-4.0, 7.0)  # more often left of the midline (image right)
            top = yc - isthmus_h / 2 + 1.0
            plen, pw = rng.uniform(15.0, 35.0), rng.uniform(3.0, 7.0)
            lean = rng.uniform(-0.25, 0.25)
            pyramidal = {
                "points": [
                    [x0 - pw / 2, top],
                    [x0 - pw / 2 + lean * plen * 0.5, top - plen * 0.5],
                    [x0 + lean * plen, top - plen],
                    [x0 + pw / 2 + lean * plen * 0.5, top - plen * 0.5],
                    [x0 + pw / 2, top],
                ],
                "uptake": float(rng.uniform(0.35, 0.7)),
                "length_mm": float(plen),
            }
    kept = [i for i in range(2) if i != removed]
    if single_lobe:  # the remaining lobe often hypertrophies after hemithyroidectomy
        grow = rng.uniform(1.0, 1.2)
        lobes[kept[0]]["width"] *= grow
        lobes[kept[0]]["length"] *= grow

    nodules: list[dict] = []
    n_cold = int(rng.choice([0, 1, 2, 3], p=[0.22, 0.4, 0.25, 0.13]))
    for _ in range(n_cold):
        li = int(rng.choice(kept))
        size_class = str(rng.choice(["small", "medium", "large"], p=[0.4, 0.4, 0.2]))
        nodules.append(_place_nodule(rng, lobes[li], li, "cold", size_class))
    n_hot = int(rng.choice([0, 1, 2], p=[0.74, 0.22, 0.04]))
    for _ in range(n_hot):
        # an adenoma is its own nodule: redraw (up to 6 times) if it would sit on a cold one
        for _attempt in range(6):
            li = int(rng.choice(kept))
            size_class = str(rng.choice(["small", "medium", "large"], p=[0.15, 0.6, 0.25]))
            hot = _place_nodule(rng, lobes[li], li, "hot", size_class)
            if all(_apart(hot, other) for other in nodules):
                nodules.append(hot)
                break
    # a toxic adenoma suppresses the TSH-driven uptake of the rest of the gland
    has_hot = any(nd["kind"] == "hot" for nd in nodules)
    suppression = float(rng.uniform(0.15, 0.6)) if has_hot and rng.random() < 0.5 else 1.0

    patchy = bool(rng.random() < 0.1)
    waves = []
    for _ in range(12):  # enough random plane waves that no stripe dominates
        wavelength = rng.uniform(7.0, 24.0)
        ang = rng.uniform(0, 2 * math.pi)
        waves.append(
            [2 * math.pi / wavelength * math.cos(ang), 2 * math.pi / wavelength * math.sin(ang)]
            + [float(rng.uniform(0, 2 * math.pi))]
        )
    salivary = []
    for side in (-1, 1):
        salivary.append(  # submandibular gland
            {
                "name": "submandibular",
                "centre": [side * rng.uniform(28.0, 42.0), -rng.uniform(45.0, 62.0)],
                "radii": [rng.uniform(9.0, 14.0), rng.uniform(6.0, 10.0)],
                "angle": side * rng.uniform(-0.2, 0.5),
                "weight": float(rng.uniform(0.7, 1.0)),
            }
        )
        salivary.append(
            {
                "name": "parotid",
                "centre": [side * rng.uniform(45.0, 60.0), -rng.uniform(85.0, 105.0)],
                "radii": [rng.uniform(10.0, 15.0), rng.uniform(15.0, 22.0)],
                "angle": side * rng.uniform(-0.3, 0.1),
                "weight": float(rng.uniform(0.8, 1.2)),
            }
        )
    sex = "F" if rng.random() < 0.75 else "M"
    age = int(rng.integers(18, 86))
    return {
        "habitus": habitus,
        "lobes": lobes,
        "kept": kept,
        "uptakes": uptakes,
        "single_lobe": single_lobe,
        "isthmus_kind": "absent" if single_lobe else isthmus_kind,
        "isthmus": isthmus,
        "pyramidal": pyramidal,
        "rim_mm": float(rng.uniform(1.5, 5.0)),
        "dome": float(rng.uniform(0.0, 0.6)),
        "nodules": nodules,
        "suppression": suppression,
        "patchy": patchy,
        "heterogeneity": float(rng.uniform(0.2, 0.3) if patchy else rng.uniform(0.02, 0.12)),
        "waves": waves,
        "salivary": salivary,
        "neck_half_width": float(rng.uniform(48.0, 65.0)),
        "sex": sex,
        "age": age,
        "name": _patient_name(rng, sex),
        "oesophagus_x": float(rng.uniform(-2.0, 8.0)),
        "jugular_x": float(rng.uniform(24.0, 34.0)),
    }


_SURNAMES = ["Quillfeather", "Marrowby", "Tessaly", "Vornholt", "Brisket", "Okonwe-Lark",
             "Dunmere", "Fallowes", "Ravensdal", "Penhallick", "Zirkova", "Almsworth"]  # fmt: skip
_GIVEN_F = ["Ysolde", "Marit", "Coralie", "Thessa", "Ondine", "Liesl", "Nerys", "Briallen"]
_GIVEN_M = ["Alaric", "Torven", "Quintus", "Emrys", "Lorcan", "Benedikt", "Cassian", "Idris"]


def _patient_name(rng: np.random.Generator, sex: str) -> str:
    given = _GIVEN_F if sex == "F" else _GIVEN_M
    return f"{rng.choice(_SURNAMES)}^{rng.choice(given)}^^^"


# --------------------------------------------------------------------------- the study
def _study(seed: int, anatomy: dict) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _STUDY])
    geometry = "pinhole" if rng.random() < 0.6 else "parallel"
    nuclide = "Tc-99m" if rng.random() < 0.75 else "I-123"
    tilt = float(np.clip(rng.normal(0.0, 6.0), -16.0, 16.0))  # patient tilt, degrees
    st: dict[str, Any] = {"geometry": geometry, "nuclide": nuclide, "tilt_deg": tilt}
    if geometry == "pinhole":
        st["fov_mm"] = float(rng.uniform(80.0, 160.0))
        st["aperture_mm"] = float(rng.uniform(1.0, 4.5))  # projected aperture disc at the gland
        st["intrinsic_fwhm_mm"] = float(rng.uniform(1.0, 2.5))
        st["halo"] = [float(rng.uniform(0.02, 0.08)), float(rng.uniform(4.0, 8.0))]
        st["cone_half_angle_deg"] = float(rng.uniform(25.0, 35.0))
        st["circular_field"] = bool(rng.random() < 0.75)
        st["collimator"] = "PINHOLE"
    else:
        st["fov_mm"] = float(rng.uniform(200.0, 300.0))
        st["core_fwhm_mm"] = float(rng.uniform(3.5, 6.8))
        st["tail"] = [float(rng.uniform(0.02, 0.1)), float(rng.uniform(1.0, 2.0))]
        st["collimator"] = str(rng.choice(["LEHR", "LEUHR", "LEGP"]))
        st["star"] = (
            [float(rng.uniform(0.03, 0.09)), float(rng.uniform(25.0, 50.0)), rng.uniform(0, 1.05)]
            if nuclide == "I-123"
            else None
        )
    st["wrong_window"] = bool(rng.random() < 0.08)
    st["scatter"] = [
        float(rng.uniform(0.4, 0.7) if st["wrong_window"] else rng.uniform(0.08, 0.22)),
        float(rng.uniform(10.0, 20.0)),
    ]
    st["background_blur"] = float(rng.uniform(1.3, 1.8))
    st["total_counts"] = float(math.exp(rng.uniform(math.log(1.0e4), math.log(1.2e6))))
    st["background"] = float(rng.uniform(0.02, 0.09))  # tissue activity per 100 mm chord / gland
    st["blood_pool"] = float(rng.uniform(0.3, 1.2))
    tracer_saliva = 1.0 if nuclide == "Tc-99m" else 0.45  # pertechnetate is secreted more
    st["salivary_uptake"] = float(rng.uniform(0.1, 0.8) * tracer_saliva)
    st["mouth"] = float(rng.uniform(0.1, 0.6) * tracer_saliva) if rng.random() < 0.4 else 0.0
    st["oesophagus"] = float(rng.uniform(0.05, 0.35)) if rng.random() < 0.2 else 0.0
    kind = str(
        rng.choice(
            ["none", "notch", "chin", "notch+chin", "lateral", "palpation", "pen"],
            p=[0.3, 0.2, 0.1, 0.12, 0.1, 0.1, 0.08],
        )
    )
    if kind == "palpation" and not any(n["kind"] == "cold" for n in anatomy["nodules"]):
        kind = "notch"
    st["marker_kind"] = kind
    st["marker_fraction"] = float(math.exp(rng.uniform(math.log(0.003), math.log(0.05))))
    st["marker_jitter"] = rng.normal(0.0, 3.0, size=4).tolist()
    st["pmt"] = float(rng.uniform(0.01, 0.05)) if rng.random() < 0.5 else 0.0
    st["pmt_pitch_mm"] = float(rng.uniform(55.0, 75.0))  # on the 400 mm crystal
    st["pmt_phase"] = rng.uniform(0, 2 * math.pi, size=3).tolist()
    st["dead_pmt"] = bool(rng.random() < 0.03)
    st["dead_pmt_at"] = rng.uniform(-0.3, 0.3, size=2).tolist()
    st["coarse_zoom"] = bool(rng.random() < 0.25)
    st["intensity_scale"] = int(rng.integers(2, 5)) if rng.random() < 0.12 else 1
    st["duration_s"] = float(rng.choice([300.0, 400.0, 600.0, 900.0]))
    st["dose_mbq"] = float(rng.uniform(70.0, 190.0) if nuclide == "Tc-99m" else rng.uniform(7, 20))
    st["place"] = rng.uniform(-1.0, 1.0, size=2).tolist()
    return st


# --------------------------------------------------------------------------- rendering
def _gland(anatomy: dict, placed: dict, grid: _Grid) -> tuple[Array, Array, Array]:
    """Gland activity (relative), thyroid mask and cold-nodule mask on a grid."""
    n = grid.n
    rim, dome = anatomy["rim_mm"], anatomy["dome"]
    activity = np.zeros((n, n), dtype=np.float32)
    gland = np.zeros((n, n), dtype=bool)
    for poly, uptake, core in placed["components"]:
        inside, depth = _polygon_fields(poly, grid, True)
        t = np.sqrt(np.clip(1.0 - (1.0 - np.minimum(depth, rim) / rim) ** 2, 0.0, 1.0))
        t = t * (1.0 + dome * np.minimum(np.maximum(depth - rim, 0.0) / core, 1.0))
        activity = np.maximum(activity, (uptake * t * inside).astype(np.float32))
        gland |= inside
    yy, xx = np.meshgrid(grid.axis, grid.axis, indexing="ij")
    het = np.zeros((n, n))
    for kx, ky, ph in placed["waves"]:
        het += np.cos(kx * xx + ky * yy + ph)
    activity *= (1.0 + anatomy["heterogeneity"] * het / math.sqrt(6.0)).clip(0.3).astype(np.float32)
    activity *= anatomy["suppression"]
    cold = np.zeros((n, n), dtype=bool)
    masks = []
    for node, balls in zip(anatomy["nodules"], placed["nodules"], strict=True):
        mask, prof = _metaball(balls, grid)
        masks.append((node, mask, prof))
        if node["bulge"]:
            gland |= mask
    hot_any = np.zeros((n, n), dtype=bool)
    for node, mask, prof in masks:
        mask &= gland
        prof = prof * mask
        lobe_uptake = anatomy["uptakes"][node["lobe"]]
        occ = node["occupancy"] * prof
        if node["kind"] == "cold":
            own = node["residual"] * lobe_uptake * anatomy["suppression"]
        else:
            own = node["uptake"] * lobe_uptake
            hot_any |= mask
        activity = activity * (1.0 - occ) + own * occ
        if node["kind"] == "cold":
            cold |= mask
    cold &= ~hot_any  # where a hot adenoma overlaps, the tissue is hot: gland, not nodule
    return activity, gland, cold


def _place(anatomy: dict, study: dict) -> dict[str, Any]:
    """Patient geometry moved into image mm: tilt about the isthmus, then a shift in the field."""
    angle = math.radians(study["tilt_deg"])
    components = []
    kept = anatomy["kept"]
    for i in kept:
        lobe = anatomy["lobes"][i]
        poly = _catmull_rom(_lobe_outline(lobe))
        components.append((poly, anatomy["uptakes"][i], max(lobe["width"] * 0.35, 2.0)))
    for key in ("isthmus", "pyramidal"):
        part = anatomy[key]
        if part is not None:
            poly = _catmull_rom(np.asarray(part["points"]))
            components.append((poly, part["uptake"], 3.0))
    every = np.concatenate([c[0] for c in components])
    for node in anatomy["nodules"]:
        if node["bulge"]:
            b = np.asarray(node["balls"])
            r = b[:, 2:3] * 1.2
            every = np.concatenate([every, b[:, :2] - r, b[:, :2] + r])
    zero = np.zeros(2)
    turned = _rotate(every, angle, zero)
    lo, hi = turned.min(0), turned.max(0)
    centre = (lo + hi) / 2
    extent = float(max(hi - lo))
    fov = study["fov_mm"]
    if study["geometry"] == "pinhole":
        # the whole gland must sit in the cone's circle with room for the blur: widen the field
        radius = float(np.hypot(*(turned - centre).T).max())
        fov = max(fov, 2.0 * radius / 0.78)
        slack = 0.5 * (0.46 * fov - radius)
        slack_xy = np.array([slack, slack]) / math.sqrt(2)
    else:
        fov = max(fov, extent / 0.6)
        slack_xy = np.maximum(0.5 * (0.8 * fov - (hi - lo)), 0.0) / 2
    shift = -centre + np.asarray(study["place"]) * np.maximum(slack_xy, 0.0)
    # the gland's centre sits low in a wide parallel-hole field (head and salivary glands above)
    if study["geometry"] == "parallel":
        shift[1] += min(0.08 * fov, float(max(0.0, 0.4 * fov - (hi[1] - centre[1]))))

    def move(p: Array) -> Array:
        return np.asarray(_rotate(p, angle, shift))

    placed: dict[str, Any] = {
        "fov": float(fov),
        "angle": angle,
        "shift": shift,
        "move": move,
        "components": [(_densify(move(p)), u, core) for p, u, core in components],
        "nodules": [],
        "waves": [],
    }
    c, s = math.cos(angle), math.sin(angle)
    for kx, ky, ph in anatomy["waves"]:  # waves live on the patient: rotate their k vectors
        kx2, ky2 = c * kx - s * ky, s * kx + c * ky
        placed["waves"].append((kx2, ky2, ph - kx2 * shift[0] - ky2 * shift[1]))
    for node in anatomy["nodules"]:
        b = np.asarray(node["balls"])
        placed["nodules"].append(np.column_stack([move(b[:, :2]), b[:, 2]]).tolist())
    return placed


def _soft_blob(grid: _Grid, centre: Array, radii: tuple[float, float], angle: float) -> Array:
    """Super-Gaussian blob (flat top, soft edge): how a salivary gland looks before blur."""
    yy, xx = np.meshgrid(grid.axis - centre[1], grid.axis - centre[0], indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * xx + s * yy) / radii[0], (-s * xx + c * yy) / radii[1]
    return np.exp(-((u * u + v * v) ** 2))


def _distractors(
    anatomy: dict, study: dict, placed: dict, grid: _Grid, gland_total: float
) -> tuple[Array, Array]:
    """(near layer, deep layer) of non-thyroid activity, relative to the gland's units."""
    n = grid.n
    move = placed["move"]
    angle = placed["angle"]
    near = np.zeros((n, n))
    deep = np.zeros((n, n))
    yy, xx = np.meshgrid(grid.axis, grid.axis, indexing="ij")
    c, s = math.cos(-angle), math.sin(-angle)
    # back to patient coordinates for the neck model
    px = c * (xx - placed["shift"][0]) - s * (yy - placed["shift"][1])
    py = s * (xx - placed["shift"][0]) + c * (yy - placed["shift"][1])
    # neck as an elliptical cylinder: activity along the line of sight is the chord length;
    # it widens to the shoulders below the gland and to the head above the jaw
    hw = anatomy["neck_half_width"]
    half = hw + np.clip(py - 45.0, 0.0, None) * 1.6 + np.clip(-py - 70.0, 0.0, None) * 0.5
    half = np.minimum(half, 190.0)
    chord = np.sqrt(np.clip(1.0 - (px / half) ** 2, 0.0, 1.0)) * (half / 60.0) ** 0.5
    deep += study["background"] * chord
    # jugular / carotid blood pool, lateral to the lobes
    for side in (-1, 1):
        d = px - side * anatomy["jugular_x"]
        deep += (
            study["background"] * study["blood_pool"] * np.exp(-(d * d) / (2 * 3.5**2)) * (py < 60)
        )
    # heart and aortic arch low in wide parallel-hole fields
    heart = _soft_blob(grid, move(np.array([[18.0, 150.0]]))[0], (55.0, 45.0), angle)
    deep += 3.0 * study["background"] * heart
    if study["oesophagus"] > 0:  # swallowed saliva: beaded vertical streak behind the gland
        d = px - anatomy["oesophagus_x"]
        beads = 0.6 + 0.4 * np.cos(py / 9.0 + anatomy["oesophagus_x"]) ** 2
        deep += study["oesophagus"] * np.exp(-(d * d) / (2 * 2.5**2)) * beads * (py > -60)
    for g in anatomy["salivary"]:
        centre = move(np.asarray([g["centre"]]))[0]
        near += (
            study["salivary_uptake"]
            * g["weight"]
            * _soft_blob(grid, centre, tuple(g["radii"]), g["angle"] + angle)
        )
    if study["mouth"] > 0:
        centre = move(np.array([[0.0, -82.0]]))[0]
        near += study["mouth"] * _soft_blob(grid, centre, (18.0, 8.0), angle)
    # markers: point sources (a few mm at most) carrying a fraction of the gland's counts
    kind = study["marker_kind"]
    jit = study["marker_jitter"]
    spots: list[Array] = []
    if "notch" in kind:
        spots.append(np.array([jit[0], 42.0 + jit[1]]))
    if "chin" in kind:
        spots.append(np.array([jit[2], -88.0 + jit[3]]))
    if kind == "lateral":
        spots.append(np.array([-(anatomy["neck_half_width"] + 4.0), 5.0 + jit[1]]))
    if kind == "palpation":
        node = next(nd for nd in anatomy["nodules"] if nd["kind"] == "cold")
        spots.append(np.asarray(node["balls"][0][:2]) + np.asarray(jit[:2]) * 0.5)
    if kind == "pen":
        for t in np.linspace(0.0, 1.0, 24):
            spots.append(np.array([-hw - 8.0 + jit[0], -40.0 + 80.0 * t]))
    if spots:
        moved = move(np.asarray(spots))
        each = study["marker_fraction"] * gland_total / len(spots) * (3 if kind == "pen" else 1)
        for x, y in moved:
            blob = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 0.8**2))
            total = blob.sum()
            if total > 1e-9:  # a marker outside the field contributes nothing
                near += each * blob / total
    return near, deep


def _kernel_hat(study: dict, shape: tuple[int, int], sp: float, depth_scale: float) -> Array:
    """rfft2 of the point-spread function on a wrap-around grid (pixel spacing sp)."""
    iy = np.fft.fftfreq(shape[0]) * shape[0] * sp
    ix = np.fft.fftfreq(shape[1]) * shape[1] * sp
    yy, xx = np.meshgrid(iy, ix, indexing="ij")
    r2 = xx * xx + yy * yy
    r = np.sqrt(r2)

    def norm(k: Array) -> Array:
        return k / k.sum()

    def gauss(fwhm: float) -> Array:
        sig = max(fwhm / 2.355, 0.3 * sp)
        return norm(np.exp(-r2 / (2 * sig * sig)))

    if study["geometry"] == "pinhole":
        ap = study["aperture_mm"] * depth_scale
        disc = norm(np.clip((ap / 2 - r) / sp + 0.5, 0.0, 1.0) + 1e-12 * (r2 == 0))
        core = np.fft.rfft2(disc) * np.fft.rfft2(gauss(study["intrinsic_fwhm_mm"] * depth_scale))
        w, f = study["halo"]
        k_hat = (1 - w) * core + w * np.fft.rfft2(gauss(f * depth_scale))
    else:
        fwhm = study["core_fwhm_mm"] * depth_scale
        w, g = study["tail"]
        gamma = g * fwhm
        tail = norm((1.0 + r2 / (gamma * gamma)) ** -1.5)  # 2-D Lorentzian (Cauchy) tail
        k_hat = (1 - w) * np.fft.rfft2(gauss(fwhm)) + w * np.fft.rfft2(tail)
        if study["star"] is not None:  # I-123's 529 keV photons through the septa: a star
            ws, reach, phase = study["star"]
            star = np.zeros(shape)
            for k in range(3):
                a = phase + k * math.pi / 3
                perp = np.abs(-math.sin(a) * xx + math.cos(a) * yy)
                star += np.exp(-(perp * perp) / (2 * 1.2**2) - r / reach)
            k_hat = (1 - ws) * k_hat + ws * np.fft.rfft2(norm(star))
    ws, sigma = study["scatter"]
    scatter = norm(np.exp(-r2 / (2 * sigma * sigma)))
    return np.asarray((1 - ws) * k_hat + ws * np.fft.rfft2(scatter))


def _fwhm_of(study: dict) -> float:
    """FWHM (mm) of the PSF's core (without scatter, halo, tail), measured on a fine grid."""
    core = dict(study)
    core["scatter"] = [0.0, 10.0]
    if core["geometry"] == "pinhole":
        core["halo"] = [0.0, 1.0]
        guess = study["aperture_mm"] + study["intrinsic_fwhm_mm"]
    else:
        core["tail"] = [0.0, 1.0]
        core["star"] = None
        guess = study["core_fwhm_mm"]
    step = guess / 40.0
    k = np.fft.irfft2(_kernel_hat(core, (256, 256), step, 1.0), s=(256, 256))
    row = np.fft.fftshift(k[0])
    peak = row.max()
    right = row[128:]
    i = int(np.argmax(right < peak / 2))
    x = i - 1 + (right[i - 1] - peak / 2) / (right[i - 1] - right[i])
    return float(2 * x * step)


def _convolve(img: Array, k_hat: Array, pad: int) -> Array:
    padded = np.pad(img, pad, mode="edge")
    out = np.fft.irfft2(np.fft.rfft2(padded) * k_hat, s=padded.shape)
    return np.asarray(out[pad:-pad, pad:-pad])


def _detector(study: dict, grid: _Grid, fov: float) -> Array:
    """Multiplicative sensitivity map: PMT lattice, failing PMT, pinhole vignetting and cone."""
    yy, xx = np.meshgrid(grid.axis, grid.axis, indexing="ij")
    sens = np.ones((grid.n, grid.n))
    # the crystal is ~400 mm wide; a pinhole magnifies, a zoomed parallel field shows a part
    scale = fov / 400.0 if study["geometry"] == "pinhole" else 1.0
    pitch = study["pmt_pitch_mm"] * scale
    if study["pmt"] > 0:
        lattice = np.zeros_like(sens)
        for k, ph in enumerate(study["pmt_phase"]):
            a = k * math.pi / 3
            lattice += np.cos(2 * math.pi / pitch * (math.cos(a) * xx + math.sin(a) * yy) + ph)
        sens *= 1.0 + study["pmt"] * lattice / 3.0
    if study["dead_pmt"]:
        cx, cy = (np.asarray(study["dead_pmt_at"]) * fov).tolist()
        sens *= 1.0 - 0.35 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.4 * pitch) ** 2))
    if study["geometry"] == "pinhole":
        h = (fov / 2) / math.tan(math.radians(study["cone_half_angle_deg"]))
        rr = np.sqrt(xx * xx + yy * yy)
        sens *= (h / np.sqrt(h * h + rr * rr)) ** 3
        if study["circular_field"]:
            sens *= np.clip((fov * 0.495 - rr) / grid.sp + 0.5, 0.0, 1.0)
    return sens


def _zoom2(img: Array) -> Array:
    """Bilinear 2x enlargement (camera 'zoom' of a matrix acquired at half the size)."""
    n = img.shape[0]
    pos = (np.arange(2 * n) + 0.5) / 2 - 0.5
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 1)
    i1 = np.clip(i0 + 1, 0, n - 1)
    w = np.clip(pos - np.floor(pos), 0.0, 1.0)
    rows = img[i0] * (1 - w)[:, None] + img[i1] * w[:, None]
    return np.asarray(rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :])


# --------------------------------------------------------------------------- header
def _uid(*parts: object) -> UID:
    return generate_uid(_UID_ROOT, entropy_srcs=["family-D", *[str(p) for p in parts]])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _header(
    pixels: Array, size: int, spacing: float, seed: int, anatomy_seed: int, patient_id: str,
    anatomy: dict, study: dict, meta: dict,
) -> Dataset:  # fmt: skip
    rng = np.random.default_rng([seed, _HEADER])
    when = _dt.datetime(2023, 3, 1, 7, 30) + _dt.timedelta(
        days=int(rng.integers(0, 900)), minutes=int(rng.integers(0, 9 * 60))
    )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = NM_IMAGE_STORAGE
    sop_uid = _uid("sop", seed, anatomy_seed, size)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
    acq = when + _dt.timedelta(minutes=int(rng.integers(15, 30)))
    ds.AcquisitionTime = ds.ContentTime = acq.strftime("%H%M%S")
    ds.AccessionNumber = f"DA{seed % 10**8:08d}"
    ds.Modality = "NM"
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = "Delphinus Reference Clinic"
    ds.ReferringPhysicianName = "Physician^Referring^^^"
    ds.StationName = f"LYRA{int(rng.integers(1, 5))}"
    pinhole = study["geometry"] == "pinhole"
    tc = study["nuclide"] == "Tc-99m"
    ds.StudyDescription = "Thyroid imaging " + ("pertechnetate" if tc else "iodide I-123")
    ds.SeriesDescription = ("Neck ANT pinhole" if pinhole else "Neck ANT planar") + " static"
    ds.ProtocolName = f"DLP_THYR_{'TC' if tc else 'I123'}_{'PIN' if pinhole else 'PAR'}"
    ds.ManufacturerModelName = "Lyra Duo" if rng.random() < 0.6 else "Lyra Solo"
    ds.DeviceSerialNumber = f"DLP-{int(rng.integers(1000, 9999))}"
    ds.SoftwareVersions = "LyraAcq 4.2"
    ds.PatientName = anatomy["name"]
    ds.PatientID = patient_id
    birth = when.year - anatomy["age"]
    ds.PatientBirthDate = f"{birth:04d}{(anatomy_seed % 12) + 1:02d}{(anatomy_seed % 28) + 1:02d}"
    ds.PatientSex = anatomy["sex"]
    ds.PatientAge = f"{anatomy['age']:03d}Y"
    ds.BodyPartExamined = "THYROID"
    ds.StudyInstanceUID = _uid("study", seed, anatomy_seed)
    ds.SeriesInstanceUID = _uid("series", seed, anatomy_seed)
    ds.StudyID = f"D{seed % 10**6:06d}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # anterior view: image right = patient left
    ds.AcquisitionContextSequence = Sequence([])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.EnergyWindowVector = [1]
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = [1]
    ds.NumberOfDetectors = 1
    ds.CountsAccumulated = int(pixels.sum(dtype=np.int64))
    ds.ActualFrameDuration = int(study["duration_s"] * 1000)
    ds.AcquisitionTerminationCondition = "TIME"
    ds.ImageID = "ANT"
    photopeak = 140.5 if tc else 159.0
    half = photopeak * (0.075 if rng.random() < 0.6 else 0.10)
    if study["wrong_window"]:  # window set for the other tracer / shifted: scatter excess
        photopeak *= 0.9
    window = Dataset()
    rng_item = Dataset()
    rng_item.EnergyWindowLowerLimit = f"{photopeak - half:.1f}"
    rng_item.EnergyWindowUpperLimit = f"{photopeak + half:.1f}"
    window.EnergyWindowRangeSequence = Sequence([rng_item])
    window.EnergyWindowName = "TC99M" if tc else "I123"
    ds.EnergyWindowInformationSequence = Sequence([window])
    pharm = Dataset()
    if tc:
        pharm.RadionuclideCodeSequence = Sequence([_code("C163A", "SRT", "^99m^Technetium")])
        pharm.Radiopharmaceutical = "Tc-99m pertechnetate"
        pharm.RadiopharmaceuticalCodeSequence = Sequence(
            [_code("C-B1031", "SRT", "Technetium Tc-99m pertechnetate")]
        )
    else:
        pharm.RadionuclideCodeSequence = Sequence([_code("C-114A3", "SRT", "^123^Iodine")])
        pharm.Radiopharmaceutical = "Sodium iodide I-123"
        pharm.RadiopharmaceuticalCodeSequence = Sequence(
            [_code("C-B1043", "SRT", "Sodium iodide I-123")]
        )
    pharm.RadionuclideTotalDose = f"{study['dose_mbq']:.1f}"
    pharm.RadiopharmaceuticalRoute = "Intravenous route"
    ds.RadiopharmaceuticalInformationSequence = Sequence([pharm])
    det = Dataset()
    det.CollimatorGridName = study["collimator"]
    det.CollimatorType = "PINH" if pinhole else "PARA"
    det.FieldOfViewShape = "ROUND" if pinhole and study.get("circular_field") else "RECTANGLE"
    det.FieldOfViewDimensions = [int(round(meta["fov_mm"]))] * (1 if pinhole else 2)
    det.ZoomFactor = [f"{400.0 / meta['fov_mm']:.4f}"] * 2 if not pinhole else ["1", "1"]
    det.FocalDistance = [int(round(meta.get("pinhole_distance_mm", 0)))] if pinhole else []
    det.ImagePositionPatient = [f"{-meta['fov_mm'] / 2:.2f}", "0", f"{meta['fov_mm'] / 2:.2f}"]
    det.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    det.ViewCodeSequence = Sequence([_code("R-10206", "SRT", "anterior")])
    ds.DetectorInformationSequence = Sequence([det])
    orient = _code("F-10450", "SRT", "recumbent")
    orient.PatientOrientationModifierCodeSequence = Sequence([_code("F-10340", "SRT", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orient])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code("F-10470", "SRT", "headfirst")])
    if rng.random() < 0.5:
        hi = float(pixels.max())
        ds.WindowCenter = f"{hi * 0.45:.0f}"
        ds.WindowWidth = f"{max(hi * 0.9, 1.0):.0f}"
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


# --------------------------------------------------------------------------- public API
def render_expected(
    seed: int, size: int, anatomy_seed: int
) -> tuple[dict, dict, dict, np.ndarray, np.ndarray, np.ndarray]:
    """The study before its counts: (anatomy, study, placement, image, thyroid, cold nodules).

    ``image`` is the noise-free activity on the acquisition matrix (half ``size`` for a coarse
    acquisition, which :func:`make_case` zooms after drawing counts); the masks are on ``size``.
    ``tools/phantom_ceiling.py`` reads the outline's visibility from it.
    """
    anatomy = _anatomy(anatomy_seed)
    study = _study(seed, anatomy)
    placed = _place(anatomy, study)
    fov = placed["fov"]
    truth_grid = _Grid(size, fov)
    acq = size // 2 if study["coarse_zoom"] else size
    ss = 2 if acq <= 128 else 1  # finer rendering, binned: no aliasing of small structures
    render = _Grid(acq * ss, fov)
    activity, thyroid, cold = _gland(anatomy, placed, render)
    if render.n != size:  # the truth is the object sampled on the stored matrix
        _, thyroid, cold = _gland(anatomy, placed, truth_grid)
    gland_total = float(activity.sum())
    near, deep = _distractors(anatomy, study, placed, render, gland_total)
    pad = max(8, render.n // 8)
    shape = (render.n + 2 * pad, render.n + 2 * pad)
    image = _convolve(activity + near, _kernel_hat(study, shape, render.sp, 1.0), pad)
    image += _convolve(deep, _kernel_hat(study, shape, render.sp, study["background_blur"]), pad)
    image = np.clip(image, 0.0, None) * _detector(study, render, fov)
    if ss > 1:
        image = image.reshape(acq, ss, acq, ss).sum((1, 3))
    return anatomy, study, placed, image, thyroid, cold


def make_case(
    seed: int,
    size: int = 256,
    *,
    patient_id: str | None = None,
    anatomy_seed: int | None = None,
) -> PhantomCase:
    """One family-D study: NM dataset, truth masks (``thyroid``, ``nodule``) and meta.

    ``anatomy_seed`` (default ``seed``) fixes the patient, ``seed`` the study.
    """
    if size < 32 or size % 4:
        raise ValueError(f"size must be a multiple of 4 and at least 32, got {size!r}")
    anatomy_seed = seed if anatomy_seed is None else anatomy_seed
    patient_id = patient_id or f"DEL-{anatomy_seed:08d}"
    anatomy, study, placed, image, thyroid, cold = render_expected(seed, size, anatomy_seed)
    fov = placed["fov"]
    acq = size // 2 if study["coarse_zoom"] else size
    rng = np.random.default_rng([seed, _STUDY, 1])
    expected = image * (study["total_counts"] / image.sum())
    counts = rng.poisson(expected).astype(np.float64)
    detected = int(counts.sum())
    if study["coarse_zoom"]:
        counts = np.rint(_zoom2(counts))
    scale = study["intensity_scale"]
    if counts.max() * scale > 65535:
        scale = 1
    pixels = np.clip(counts * scale, 0, 65535).astype(np.uint16)

    spacing = fov / size
    fwhm = _fwhm_of(study)
    meta: dict[str, Any] = {
        "family": "D",
        "seed": int(seed),
        "anatomy_seed": int(anatomy_seed),
        "size": int(size),
        "patient_id": patient_id,
        "total_counts": detected,
        "pixel_sum": int(pixels.sum(dtype=np.int64)),
        "pixel_spacing_mm": float(f"{spacing:.6g}"),
        "fov_mm": round(fov, 3),
        "fwhm_mm": round(fwhm, 3),
        "geometry": study["geometry"],
        "collimator": study["collimator"],
        "nuclide": study["nuclide"],
        "tilt_deg": round(study["tilt_deg"], 2),
        "habitus": anatomy["habitus"],
        "single_lobe": anatomy["single_lobe"],
        "isthmus": anatomy["isthmus_kind"],
        "pyramidal_lobe": anatomy["pyramidal"] is not None,
        "lobe_uptake_ratio": round(anatomy["uptakes"][1], 3),
        "lobe_lengths_mm": [round(anatomy["lobes"][i]["length"], 2) for i in anatomy["kept"]],
        "lobe_widths_mm": [round(anatomy["lobes"][i]["width"], 2) for i in anatomy["kept"]],
        "rim_mm": round(anatomy["rim_mm"], 2),
        "heterogeneity": round(anatomy["heterogeneity"], 3),
        "patchy": anatomy["patchy"],
        "suppression": round(anatomy["suppression"], 3),
        "cold_nodules": [_nodule_meta(nd) for nd in anatomy["nodules"] if nd["kind"] == "cold"],
        "hot_nodules": [_nodule_meta(nd) for nd in anatomy["nodules"] if nd["kind"] == "hot"],
        "salivary_uptake": round(study["salivary_uptake"], 3),
        "mouth": study["mouth"] > 0,
        "oesophagus": study["oesophagus"] > 0,
        "marker_kind": study["marker_kind"],
        "scatter_fraction": round(study["scatter"][0], 3),
        "wrong_window": study["wrong_window"],
        "septal_star": study.get("star") is not None,
        "pmt_nonuniformity": round(study["pmt"], 3),
        "dead_pmt": study["dead_pmt"],
        "circular_field": bool(study.get("circular_field", False)),
        "coarse_zoom": study["coarse_zoom"],
        "acquisition_matrix": int(acq),
        "intensity_scale": int(scale),
    }
    if study["geometry"] == "pinhole":
        h = (fov / 2) / math.tan(math.radians(study["cone_half_angle_deg"]))
        meta["pinhole_distance_mm"] = round(h, 1)
    ds = _header(pixels, size, spacing, seed, anatomy_seed, patient_id, anatomy, study, meta)
    return PhantomCase(dataset=ds, truth={"thyroid": thyroid, "nodule": cold}, meta=meta)


def _nodule_meta(node: dict) -> dict[str, Any]:
    out = {
        "diameter_mm": float(node["diameter_mm"]),
        "location": node["location"],
        "lobe": "right" if node["lobe"] == 0 else "left",
        "size_class": node["size_class"],
        "bulge": node["bulge"],
    }
    if node["kind"] == "cold":
        out["residual"] = round(node["residual"], 3)
        out["occupancy"] = round(node["occupancy"], 3)
    else:
        out["uptake"] = round(node["uptake"], 3)
    return out


def write_cases(
    out: Path | str,
    n: int,
    seed: int,
    size: int | list[int] = 256,
    progress: Any = None,
) -> list[Path]:
    """Write ``n`` family-D studies to ``OUT/<case>/image.dcm`` + ``truth.npz``.

    Same plan as the other families (:func:`dicom_node.demo.phantoms.plan_cases`); patient IDs
    get a ``D`` prefix.
    """
    return write_planned_cases(make_case, out, n, seed, size, progress, prefix="D")
