"""Phantom family C: thyroid scintigraphy built as a 3-D object and imaged by projection.

Family C is a third, independently written style, **never trained on**: it exists to report
figures on phantoms the model (trained on families A and B) has never seen. It was written from
the contract only (``PhantomCase``, ``make_case``/``write_cases`` signatures, the truth dict, a
valid NM Image Storage header), not from A's or B's rendering code.

=====================  ==========================================================================
aspect                 family C (this module)
=====================  ==========================================================================
gland                  3-D: each lobe a tapered, bent, leaning ellipsoid (pear shape, pointed
                       upper pole, rippled radius); isthmus a curved 3-D band in front of the
                       trachea; optional pyramidal lobe (tapered rod); unequal lobes, goitres,
                       small glands, hemithyroidectomy
nodules                cold: rotated 3-D ellipsoids (some lumpy unions of 2-3), 5 mm up to most
                       of a lobe, anywhere incl. poles and surface, some bulging out; residual
                       uptake 0-30 %; hot: 1.8-4x uptake, sometimes with suppressed gland
uptake                 3-D random-wave field (patchy thyroiditis sometimes), per-lobe factor
imaging                slab by slab (1 mm): parallel-hole blur growing linearly with distance,
                       or pinhole with per-depth magnification, depth blur, circular field and
                       cos^3 vignetting; attenuation exp(-mu z); scatter as an exponential
                       kernel; detector non-uniformity; Poisson counts 1.5e4-1e6
distractors            neck/shoulder/head body background, blood-pool mode with vessels,
                       parotid, submandibular and oral activity, oesophagus, stomach, point
                       markers, a ruler of dots or a line source
header                 "Cygnus Nuclear" vendor style: window centre/width and smallest/largest
                       pixel value sometimes, acquisition date-time, coded patient orientation
                       (recumbent, supine, headfirst), always 16 bits (NM allows 8 or 16 only)
=====================  ==========================================================================

Truth: ``thyroid`` = pixels whose centre lies inside the projection of the 3-D gland (nodules and
bulges included; perspective projection for pinhole); ``nodule`` = the projection of the cold
nodules. Every range is documented in ``training/README.md`` ("Family C: every random
choice").
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.demo.phantoms import NM_IMAGE_STORAGE, PhantomCase, write_planned_cases

LOGGER = logging.getLogger(__name__)

_UID_ROOT = "1.2.826.0.1.3680043.8.498."
_DZ = 1.0  # slab thickness (mm) of the depth integration
_GROUP = 3  # slabs sharing one blur
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

# parallel-hole collimators: (name, FWHM at the face mm, FWHM growth per mm of distance)
_COLLIMATORS = (("LEUHR", 0.4, 0.030), ("LEHR", 0.6, 0.042), ("LEAP", 0.9, 0.060))


# ----------------------------------------------------------------------------- anatomy (3-D)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random 3-D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _lobe(rng: np.random.Generator, side: int, scale: float, front: float) -> dict[str, Any]:
    """A pear-shaped lobe: tapered, bent, leaning ellipsoid. ``side`` +1 = patient's left."""
    half = rng.uniform(17.0, 27.0) * scale
    rx = rng.uniform(6.0, 10.5) * math.sqrt(scale)
    rz = rng.uniform(6.0, 9.5) * math.sqrt(scale)
    return {
        "side": side,
        "half": half,
        "yc": -rng.uniform(0.15, 0.4) * half,  # isthmus lies in the lower third
        "x0": rng.uniform(10.0, 14.0) + 0.85 * rx,
        "lean": rng.uniform(1.0, 8.0),
        "bend": rng.uniform(-3.0, 3.0),
        "z0": front + rz,
        "arch": rng.uniform(1.0, 6.0),
        "rx": rx,
        "rz": rz,
        "taper": rng.uniform(0.05, 0.35),
        "q_top": rng.uniform(1.5, 2.2),
        "q_bot": rng.uniform(2.2, 3.6),
        "ripple": rng.uniform(0.0, 0.08),
        "ripple_n": rng.uniform(1.5, 3.5),
        "ripple_phase": rng.uniform(0.0, 2 * math.pi),
        "uptake": rng.uniform(0.8, 1.2),
    }


def _lobe_axis(lobe: dict[str, Any], t: Any) -> tuple[Any, Any, Any, Any]:
    """Centre (x, z) and radii (rx, rz) of a lobe's cross-section at axial parameter ``t``."""
    cx = lobe["side"] * (lobe["x0"] - lobe["lean"] * t + lobe["bend"] * (t * t - 0.33))
    cz = lobe["z0"] + lobe["arch"] * t * t
    wave = 1.0 + lobe["ripple"] * np.sin(math.pi * lobe["ripple_n"] * t + lobe["ripple_phase"])
    rx = lobe["rx"] * (1.0 + lobe["taper"] * t) * wave
    rz = lobe["rz"] * (1.0 + 0.6 * lobe["taper"] * t)
    return cx, cz, rx, rz


def _in_lobe(lobe: dict[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    t = (y - lobe["yc"]) / lobe["half"]
    tc = np.clip(t, -1.0, 1.0)
    cx, cz, rx, rz = _lobe_axis(lobe, tc)
    q = np.where(tc < 0, lobe["q_top"], lobe["q_bot"])
    g = ((x - cx) / rx) ** 2 + ((z - cz) / rz) ** 2 + np.abs(tc) ** q
    return np.asarray((g <= 1.0) & (np.abs(t) <= 1.0))


def _in_isthmus(ist: dict[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    u = x / ist["reach"]
    yi = ist["y0"] + ist["droop"] * u * u
    # thinner at the midline, widening into a fillet where it meets the lobes
    hi = ist["half_height"] * (0.6 + 0.3 * u * u) + ist["fillet"] * u**6
    g = ((y - yi) / hi) ** 2 + ((z - ist["z0"]) / ist["half_thick"]) ** 2
    return np.asarray((g <= 1.0) & (np.abs(u) <= 1.0))


def _in_rod(rod: dict[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Tapered rod from ``start`` along unit ``dir`` (the pyramidal lobe)."""
    sx, sy, sz = rod["start"]
    dx, dy, dz = rod["dir"]
    px, py, pz = x - sx, y - sy, z - sz
    along = px * dx + py * dy + pz * dz
    p = np.clip(along / rod["length"], 0.0, 1.0)
    ex, ey, ez = px - along * dx, py - along * dy, pz - along * dz
    r = rod["r0"] + (rod["r1"] - rod["r0"]) * p
    inside = (ex * ex + ey * ey + ez * ez <= r * r) & (along >= 0) & (along <= rod["length"])
    return np.asarray(inside)


def _in_ellipsoid(body: dict[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Rotated ellipsoid: ``body["inv"]`` maps offsets into unit-sphere coordinates."""
    cx, cy, cz = body["centre"]
    m = body["inv"]
    ox, oy, oz = x - cx, y - cy, z - cz
    a = m[0, 0] * ox + m[0, 1] * oy + m[0, 2] * oz
    b = m[1, 0] * ox + m[1, 1] * oy + m[1, 2] * oz
    c = m[2, 0] * ox + m[2, 1] * oy + m[2, 2] * oz
    return np.asarray(a * a + b * b + c * c <= 1.0)


def _ellipsoid(centre: tuple[float, float, float], radii: np.ndarray, rot: np.ndarray) -> dict:
    inv = (rot / radii[None, :]).T  # row i: axis i divided by its radius
    return {"centre": centre, "radii": radii, "inv": inv, "reach": float(radii.max())}


def _nodule(
    rng: np.random.Generator, lobe: dict[str, Any], kind: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A cold or hot nodule in ``lobe``: its ellipsoid bodies and its meta record."""
    big = kind == "cold" and rng.random() < 0.14
    if big:  # fills most of the lobe
        t = rng.uniform(-0.3, 0.4)
    elif kind == "cold":
        t = rng.uniform(-0.93, 0.93)
    else:
        t = rng.uniform(-0.7, 0.7)
    cx, cz, rx, rz = (float(v) for v in _lobe_axis(lobe, t))
    q = lobe["q_top"] if t < 0 else lobe["q_bot"]
    envelope = math.sqrt(max(1.0 - abs(t) ** q, 0.05))  # the cross-section shrinks to the poles
    rx, rz = rx * envelope, rz * envelope
    lobe_width = 2.0 * min(rx, rz)
    if big:
        diameter = lobe_width * rng.uniform(0.8, 1.1)
    else:
        top = max(6.0, min(32.0, 0.8 * lobe_width)) if kind == "cold" else max(9.0, lobe_width)
        low = 5.0 if kind == "cold" else 8.0
        diameter = float(np.exp(rng.uniform(math.log(low), math.log(max(top, low + 1)))))
    radii = diameter / 2.0 * rng.uniform(0.75, 1.25, size=3)
    if big:
        radii[1] *= rng.uniform(1.0, 1.5)  # elongated along the lobe
    fit = max(0.0, 1.0 - 1.05 * float(radii.max()) / min(rx, rz))  # offsets that keep it inside
    if big:
        rho = rng.uniform(0.0, 0.3)
    elif kind == "cold" and rng.random() < 0.25:  # at the surface, often bulging out
        rho = rng.uniform(max(fit, 0.6), 1.0)
    else:
        rho = fit * math.sqrt(rng.random()) * (1.0 if kind == "cold" else 0.7)
    phi = rng.uniform(0.0, 2 * math.pi)
    centre = (
        cx + rho * rx * math.cos(phi),
        lobe["yc"] + t * lobe["half"],
        cz + rho * rz * math.sin(phi),
    )
    rot = _rotation(rng)
    bodies = [_ellipsoid(centre, radii, rot)]
    irregular = kind == "cold" and rng.random() < 0.25
    if irregular:
        for _ in range(int(rng.integers(1, 3))):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            off = d * radii.mean() * rng.uniform(0.45, 0.8)
            sub_radii = radii * rng.uniform(0.4, 0.7)
            sub_centre = (centre[0] + off[0], centre[1] + off[1], centre[2] + off[2])
            bodies.append(_ellipsoid(sub_centre, sub_radii, _rotation(rng)))
    reach = rho * min(rx, rz) + float(radii.max())
    bulge = reach > min(rx, rz) * 1.02
    location = "pole" if abs(t) > 0.7 else ("surface" if bulge or rho > 0.75 else "inside")
    meta = {
        "lobe": "left" if lobe["side"] > 0 else "right",
        "diameter_mm": round(float(2 * radii.max()), 2),
        "location": location,
        "bulge": bool(bulge),
        "irregular": bool(irregular),
        "big": bool(big),
        "depth_mm": round(centre[2], 1),
    }
    if kind == "cold":
        meta["residual_uptake"] = round(float(rng.uniform(0.0, 0.3)), 3)
    else:
        meta["uptake_factor"] = round(float(rng.uniform(1.8, 4.0)), 3)
    return bodies, meta


def _waves(rng: np.random.Generator, n: int) -> list[tuple[float, float, float, float]]:
    out = []
    for _ in range(n):
        d = rng.normal(size=3)
        k = 2 * math.pi / rng.uniform(6.0, 30.0) * d / np.linalg.norm(d)
        out.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * math.pi))))
    return out


def _anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Everything that belongs to the patient (shared by all of a patient's studies)."""
    r = rng.random()
    habitus = "goitre" if r < 0.12 else ("small" if r < 0.22 else "normal")
    scale = {"goitre": rng.uniform(1.35, 1.8), "small": rng.uniform(0.65, 0.82)}.get(
        habitus, rng.uniform(0.85, 1.15)
    )
    front = rng.uniform(7.0, 18.0)  # skin to the gland's anterior surface
    right_scale = scale * rng.uniform(0.95, 1.15)
    left_scale = scale * rng.uniform(0.7, 1.1)
    lobes = [_lobe(rng, -1, right_scale, front), _lobe(rng, +1, left_scale, front)]
    single = rng.random() < 0.05
    if single:
        lobes = [lobes[int(rng.integers(0, 2))]]
    isthmus = None
    if not single and rng.random() < 0.85:
        thick = rng.uniform(1.2, 4.0) * math.sqrt(scale)
        isthmus = {
            "reach": float(np.mean([lb["x0"] for lb in lobes])),
            "y0": rng.uniform(-3.0, 6.0),
            "droop": rng.uniform(-5.0, 3.0),
            "half_height": rng.uniform(3.0, 8.5) * math.sqrt(scale),
            "half_thick": thick,
            "fillet": rng.uniform(2.0, 8.0),
            "z0": front + thick + rng.uniform(0.0, 2.0),
        }
    pyramidal = None
    if isthmus is not None and rng.random() < 0.15:
        angle = math.radians(rng.uniform(-20.0, 20.0))
        pyramidal = {
            "start": (
                rng.uniform(-2.0, 7.0),
                isthmus["y0"] - isthmus["half_height"] * 0.5,
                isthmus["z0"],
            ),
            "dir": (math.sin(angle), -math.cos(angle), 0.0),
            "length": rng.uniform(12.0, 30.0),
            "r0": rng.uniform(2.5, 4.5),
            "r1": rng.uniform(0.8, 1.6),
        }
    n_cold = int(rng.choice([0, 1, 1, 1, 2, 2, 3, 4]))
    volumes = np.array([lb["half"] * lb["rx"] * lb["rz"] for lb in lobes])
    cold, cold_meta, hot, hot_meta = [], [], [], []
    for _ in range(n_cold):
        lobe = lobes[int(rng.choice(len(lobes), p=volumes / volumes.sum()))]
        bodies, meta = _nodule(rng, lobe, "cold")
        cold.append((bodies, meta["residual_uptake"]))
        cold_meta.append(meta)
    if rng.random() < 0.22:
        for _ in range(int(rng.integers(1, 3))):
            lobe = lobes[int(rng.integers(0, len(lobes)))]
            bodies, meta = _nodule(rng, lobe, "hot")
            hot.append((bodies, meta["uptake_factor"]))
            hot_meta.append(meta)
    patchy = rng.random() < 0.07
    salivary = []
    for side in (-1, 1):
        parotid_conc = rng.uniform(0.1, 1.0)
        salivary.append(
            {
                "name": "parotid",
                "centre": (
                    side * rng.uniform(46.0, 62.0),
                    -rng.uniform(62.0, 90.0),
                    rng.uniform(25.0, 45.0),
                ),
                "radii": (rng.uniform(9.0, 15.0), rng.uniform(15.0, 24.0), rng.uniform(9.0, 14.0)),
                "conc": parotid_conc,
            }
        )
        salivary.append(
            {
                "name": "submandibular",
                "centre": (
                    side * rng.uniform(24.0, 38.0),
                    -rng.uniform(40.0, 60.0),
                    rng.uniform(15.0, 28.0),
                ),
                "radii": (rng.uniform(7.0, 12.0), rng.uniform(5.5, 10.0), rng.uniform(6.0, 10.0)),
                "conc": parotid_conc * rng.uniform(0.6, 1.4),
            }
        )
    return {
        "habitus": habitus,
        "scale": scale,
        "lobes": lobes,
        "isthmus": isthmus,
        "pyramidal": pyramidal,
        "single_lobe": single,
        "cold": cold,
        "cold_meta": cold_meta,
        "hot": hot,
        "hot_meta": hot_meta,
        "suppressed": bool(hot and rng.random() < 0.35),
        "waves": _waves(rng, 14),
        "wave_amp": rng.uniform(0.35, 0.7) if patchy else rng.uniform(0.04, 0.22),
        "patchy": patchy,
        "salivary": salivary,
        "neck_half_width": rng.uniform(45.0, 65.0),
        "neck_depth_ratio": rng.uniform(0.8, 1.0),
        "shoulder_y": rng.uniform(45.0, 80.0),
        "jaw_y": -rng.uniform(45.0, 65.0),
    }


def _gland_bounds(anat: dict[str, Any]) -> tuple[float, float, float, float, float, float]:
    """Conservative (x0, x1, y0, y1, z0, z1) of everything that is gland, in mm."""
    xs, ys, zs = [], [], []
    for lb in anat["lobes"]:
        reach_x = lb["x0"] + lb["lean"] + abs(lb["bend"]) + lb["rx"] * 1.45
        xs += [lb["side"] * reach_x, lb["side"] * max(lb["x0"] - lb["lean"] - lb["rx"] * 1.45, 0)]
        ys += [lb["yc"] - lb["half"], lb["yc"] + lb["half"]]
        zs += [lb["z0"] - lb["rz"] * 1.25, lb["z0"] + lb["arch"] + lb["rz"] * 1.25]
    if anat["isthmus"] is not None:
        ist = anat["isthmus"]
        xs += [-ist["reach"], ist["reach"]]
        ys += [ist["y0"] - 12.0, ist["y0"] + 12.0]
    if anat["pyramidal"] is not None:
        rod = anat["pyramidal"]
        sx, sy, _ = rod["start"]
        ex, ey = sx + rod["dir"][0] * rod["length"], sy + rod["dir"][1] * rod["length"]
        xs += [sx - 5, sx + 5, ex - 5, ex + 5]
        ys += [sy + 5, ey - 5]
    for bodies, _ in anat["cold"] + anat["hot"]:
        for b in bodies:
            cx, cy, cz = b["centre"]
            xs += [cx - b["reach"], cx + b["reach"]]
            ys += [cy - b["reach"], cy + b["reach"]]
            zs += [cz - b["reach"], cz + b["reach"]]
    return min(xs), max(xs), min(ys), max(ys), max(min(zs), 0.5), max(zs)


# ----------------------------------------------------------------------------- imaging


def _study(rng: np.random.Generator, anat: dict[str, Any], size: int) -> dict[str, Any]:
    """Everything that belongs to this acquisition."""
    x0, x1, y0, y1, z0, z1 = _gland_bounds(anat)
    width = max(x1 - x0, y1 - y0)
    z_mid = 0.5 * (z0 + z1)
    geometry = "pinhole" if rng.random() < 0.5 else "parallel"
    st: dict[str, Any] = {"geometry": geometry, "z_mid": z_mid}
    if geometry == "pinhole":
        focal = rng.uniform(200.0, 300.0)
        standoff = rng.uniform(25.0, 80.0)  # aperture to skin
        d_mid = standoff + z_mid
        aperture = rng.uniform(0.8, 4.5)
        intrinsic = rng.uniform(3.0, 4.0)
        fov = max(rng.uniform(70.0, 170.0), width * 1.15)
        st.update(
            focal=focal,
            standoff=standoff,
            d_mid=d_mid,
            aperture=aperture,
            intrinsic=intrinsic,
            fov=fov,
            collimator="PINHOLE",
        )
        offset = (rng.uniform(-0.05, 0.05) * fov, rng.uniform(-0.04, 0.08) * fov)
        # the cone of the pinhole must hold the gland (the truth must be where counts can be)
        st["field_radius"] = max(
            rng.uniform(0.42, 0.75) * fov,
            0.45 * math.hypot(x1 - x0, y1 - y0) + math.hypot(*offset),
        )
    else:
        name, c0, c1 = _COLLIMATORS[int(rng.integers(0, len(_COLLIMATORS)))]
        fov = float(np.exp(rng.uniform(math.log(100.0), math.log(320.0))))
        fov = max(fov, width * 1.2)
        st.update(
            gap=rng.uniform(0.0, 35.0),
            c0=c0,
            c1=c1,
            intrinsic=rng.uniform(3.0, 3.9),
            fov=fov,
            collimator=name,
        )
        offset = (rng.uniform(-0.07, 0.07) * fov, rng.uniform(-0.04, 0.14) * fov)
    st["pixel"] = fov / size
    st["tilt"] = math.radians(rng.uniform(-8.0, 8.0))
    # the gland's box centre sits at ``offset`` in the image: place the gland origin accordingly
    c, sn = math.cos(st["tilt"]), math.sin(st["tilt"])
    gx, gy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    st["centre"] = (offset[0] - (c * gx - sn * gy), offset[1] - (sn * gx + c * gy))
    st["mu"] = rng.uniform(0.012, 0.0155)  # per mm, 140 keV in soft tissue
    st["scatter_fraction"] = rng.uniform(0.12, 0.45)
    st["scatter_length"] = rng.uniform(7.0, 25.0)
    st["head_shift"] = rng.uniform(-10.0, 10.0)  # neck extension moves the salivary glands
    st["blood_pool"] = rng.random() < 0.1
    st["tbr"] = rng.uniform(8.0, 16.0) if st["blood_pool"] else rng.uniform(14.0, 70.0)
    st["salivary_gain"] = rng.uniform(0.3, 1.6)
    st["total"] = float(np.exp(rng.uniform(math.log(1.5e4), math.log(1.0e6))))
    return st


def _scale(st: dict[str, Any], z: float) -> float:
    """Object size per image-plane mm at depth ``z`` (1 for parallel-hole)."""
    if st["geometry"] == "pinhole":
        return float((st["standoff"] + z) / st["d_mid"])
    return 1.0


def _fwhm(st: dict[str, Any], z: float) -> float:
    """System FWHM (mm, in the gland plane) of a source at depth ``z`` below the skin."""
    if st["geometry"] == "pinhole":
        dist = st["standoff"] + z
        geometric = st["aperture"] * (dist + st["focal"]) / st["focal"]
        intrinsic = st["intrinsic"] * dist / st["focal"]
        return math.hypot(geometric, intrinsic) * st["d_mid"] / dist
    dist = st["gap"] + z
    return math.hypot(st["intrinsic"], st["c0"] + st["c1"] * dist)


def _object_coords(
    st: dict[str, Any], u: np.ndarray, v: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray]:
    """Image-plane mm (from image centre) -> patient mm (from the gland origin) at depth z."""
    s = _scale(st, z)
    cu, cv = st["centre"]
    a, b = u * s - cu, v * s - cv
    c, sn = math.cos(st["tilt"]), math.sin(st["tilt"])
    return c * a + sn * b, -sn * a + c * b


class _Spectrum:
    """Accumulates blurred sources in the Fourier domain of a zero-padded grid."""

    def __init__(self, size: int, pixel: float) -> None:
        self.size, self.pixel = size, pixel
        self.pad = 2 * size
        fy = np.fft.fftfreq(self.pad)[:, None]
        fx = np.fft.rfftfreq(self.pad)[None, :]
        self.f2 = fx * fx + fy * fy  # cycles per pixel, squared
        self.acc = np.zeros(self.f2.shape, dtype=np.complex128)

    def add(self, img: np.ndarray, top: int, left: int, fwhm_mm: float) -> None:
        grid = np.zeros((self.pad, self.pad))
        h, w = img.shape
        grid[top : top + h, left : left + w] = img
        sigma = fwhm_mm / _FWHM / self.pixel
        otf = np.exp(-2.0 * math.pi**2 * sigma**2 * self.f2)
        self.acc += np.fft.rfft2(grid) * otf

    def image(self, scatter_fraction: float, scatter_length_mm: float) -> np.ndarray:
        lam = scatter_length_mm / self.pixel
        kernel = (1.0 + (2.0 * math.pi * lam) ** 2 * self.f2) ** -1.5  # exponential, 2-D
        out = np.fft.irfft2(self.acc * (1.0 + scatter_fraction * kernel), s=(self.pad, self.pad))
        return np.clip(out[: self.size, : self.size], 0.0, None)


def _uptake(anat: dict[str, Any], x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    field = np.zeros_like(x)
    for kx, ky, kz, ph in anat["waves"]:
        field += np.cos(kx * x + ky * y + kz * z + ph)
    field *= anat["wave_amp"] / math.sqrt(len(anat["waves"]) / 2.0)
    return np.asarray(np.clip(1.0 + field, 0.15, None))


def _gland_slabs(
    anat: dict[str, Any], st: dict[str, Any], size: int, spectrum: _Spectrum
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Project the 3-D gland slab by slab; returns (thyroid, nodule, volume_ml, gland_signal)."""
    x0, x1, y0, y1, z0, z1 = _gland_bounds(anat)
    pixel = st["pixel"]
    k = 1 if pixel <= 0.9 else 3  # odd: the middle sub-sample is the pixel centre
    # image-plane box (pixels) that holds the gland at every depth
    corners_u, corners_v = [], []
    c, sn = math.cos(st["tilt"]), math.sin(st["tilt"])
    for z in (z0, z1):
        s = _scale(st, z)
        for xx in (x0, x1):
            for yy in (y0, y1):
                a, b = c * xx - sn * yy, sn * xx + c * yy
                corners_u.append((a + st["centre"][0]) / s)
                corners_v.append((b + st["centre"][1]) / s)
    half = size / 2.0
    left = max(int(math.floor(min(corners_u) / pixel + half)) - 2, 0)
    right = min(int(math.ceil(max(corners_u) / pixel + half)) + 2, size)
    top = max(int(math.floor(min(corners_v) / pixel + half)) - 2, 0)
    bottom = min(int(math.ceil(max(corners_v) / pixel + half)) + 2, size)
    thyroid = np.zeros((size, size), dtype=bool)
    nodule = np.zeros((size, size), dtype=bool)
    if right <= left or bottom <= top:
        return thyroid, nodule, 0.0, 0.0
    h, w = bottom - top, right - left
    sub = (np.arange(k) + 0.5) / k - 0.5
    cols = ((np.arange(left, right)[:, None] + 0.5 + sub[None, :]).ravel() - half) * pixel
    rows = ((np.arange(top, bottom)[:, None] + 0.5 + sub[None, :]).ravel() - half) * pixel
    u, v = np.meshgrid(cols, rows)
    centre_rows, centre_cols = slice(k // 2, None, k), slice(k // 2, None, k)
    foot_t = np.zeros((h, w), dtype=bool)
    foot_n = np.zeros((h, w), dtype=bool)
    volume, signal = 0.0, 0.0
    depths = np.arange(z0 + _DZ / 2, z1, _DZ)
    for g0 in range(0, len(depths), _GROUP):
        group = depths[g0 : g0 + _GROUP]
        acc = np.zeros((h * k, w * k))
        for z in group:
            x, y = _object_coords(st, u, v, float(z))
            act, body, cold_any = _slab(anat, x, y, float(z))
            att = math.exp(-st["mu"] * float(z))
            acc += act * att * _DZ
            foot_t |= body[centre_rows, centre_cols]
            foot_n |= cold_any[centre_rows, centre_cols]
            s = _scale(st, float(z))
            volume += float(body.sum()) * (pixel / k * s) ** 2 * _DZ / 1000.0
        img = acc.reshape(h, k, w, k).mean(axis=(1, 3))
        signal += float(img.sum())
        spectrum.add(img, top, left, _fwhm(st, float(group.mean())))
    thyroid[top:bottom, left:right] = foot_t
    nodule[top:bottom, left:right] = foot_n & foot_t
    return thyroid, nodule, volume, signal


def _slab(
    anat: dict[str, Any], x: np.ndarray, y: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activity, gland body (nodules and bulges included) and cold nodules of one depth slab."""
    gland = np.zeros(x.shape, dtype=bool)
    for lb in anat["lobes"]:
        gland |= _in_lobe(lb, x, y, z)
    if anat["isthmus"] is not None:
        gland |= _in_isthmus(anat["isthmus"], x, y, z)
    if anat["pyramidal"] is not None:
        gland |= _in_rod(anat["pyramidal"], x, y, z)
    # a toxic adenoma suppresses the rest of the gland
    act = np.where(gland, 0.35 if anat["suppressed"] else 1.0, 0.0)
    nodules = np.zeros(x.shape, dtype=bool)
    cold_any = np.zeros(x.shape, dtype=bool)
    for kind in ("hot", "cold"):  # cold wins where a cold and a hot nodule overlap
        for bodies, value in anat[kind]:
            m = np.zeros(x.shape, dtype=bool)
            for b in bodies:
                m |= _in_ellipsoid(b, x, y, z)
            act[m] = value
            nodules |= m
            if kind == "cold":
                cold_any |= m
    body = gland | nodules
    if body.any():
        act[body] *= _uptake(anat, x[body], y[body], z) * _lobe_factor(anat, x[body])
    return act, body, cold_any


def _lobe_factor(anat: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Per-lobe uptake, blended smoothly across the midline."""
    right = [lb["uptake"] for lb in anat["lobes"] if lb["side"] < 0]
    left = [lb["uptake"] for lb in anat["lobes"] if lb["side"] > 0]
    r = right[0] if right else left[0]
    lf = left[0] if left else r
    w = np.clip(0.5 + x / 20.0, 0.0, 1.0)
    return np.asarray(r + (lf - r) * w)


def _image_grid(size: int, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size) + 0.5 - size / 2.0) * pixel
    return np.meshgrid(axis, axis)


def _ellipsoid_thickness(
    st: dict[str, Any],
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    """Chord length (mm) of an axis-aligned ellipsoid along depth, seen in the image plane."""
    x, y = _object_coords(st, u, v, centre[2])
    q = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    return np.asarray(2.0 * radii[2] * np.sqrt(np.clip(1.0 - q, 0.0, None)))


def _distractors(
    rng: np.random.Generator,
    anat: dict[str, Any],
    st: dict[str, Any],
    size: int,
    spectrum: _Spectrum,
    signal: float,
) -> dict[str, Any]:
    """Body background, salivary glands, oesophagus, stomach and markers (never truth)."""
    pixel = st["pixel"]
    u, v = _image_grid(size, pixel)
    conc_bg = 1.0 / st["tbr"]
    mu = st["mu"]
    # body: neck between jaw and shoulders, widening into head above and chest below
    neck_z = anat["neck_half_width"] * anat["neck_depth_ratio"]
    x, y = _object_coords(st, u, v, neck_z)
    soft = 12.0  # mm: rounded jaw and shoulder lines (softplus)
    below = soft * np.logaddexp(0.0, (y - anat["shoulder_y"]) / soft)
    above = soft * np.logaddexp(0.0, (anat["jaw_y"] - y) / soft)
    a = np.minimum(anat["neck_half_width"] + 1.8 * below + 0.9 * above, 190.0)
    chord = (
        2.0
        * neck_z
        * (a / anat["neck_half_width"]) ** 0.3
        * np.sqrt(np.clip(1.0 - (x / a) ** 2, 0.0, None))
    )
    body = conc_bg * chord * (1.0 - np.exp(-mu * chord)) / np.maximum(mu * chord, 1e-6)
    if st["blood_pool"]:  # carotids / jugulars lateral to the lobes
        for side in (-1, 1):
            xv = side * rng.uniform(22.0, 32.0)
            body += conc_bg * 3.0 * 8.0 * np.exp(-0.5 * ((x - xv) / 4.0) ** 2) * math.exp(-mu * 25)
    spectrum.add(body, 0, 0, _fwhm(st, neck_z) * 1.5)
    found: dict[str, Any] = {
        "salivary_glands": [],
        "markers": [],
        "oesophagus": False,
        "stomach": False,
    }
    organs = np.zeros((size, size))
    for gland in anat["salivary"]:
        cx, cy, cz = gland["centre"]
        centre = (cx, cy + st["head_shift"], cz)
        conc = gland["conc"] * st["salivary_gain"] * rng.uniform(0.85, 1.15)
        thick = _ellipsoid_thickness(st, u, v, centre, gland["radii"])
        if thick.any():
            found["salivary_glands"].append({"name": gland["name"], "conc": round(conc, 3)})
        organs += conc * thick * math.exp(-mu * cz)
    if rng.random() < 0.2:  # saliva in the mouth / sublingual
        centre = (rng.uniform(-5, 5), -rng.uniform(70, 95) + st["head_shift"], 30.0)
        radii = (rng.uniform(10, 18), rng.uniform(6, 10), rng.uniform(10, 15))
        organs += rng.uniform(0.1, 0.6) * _ellipsoid_thickness(st, u, v, centre, radii) * 0.6
    if rng.random() < 0.1:  # swallowed activity in the oesophagus, behind the trachea
        found["oesophagus"] = True
        x, y = _object_coords(st, u, v, 40.0)
        xc = rng.uniform(-3.0, 8.0) + 2.0 * np.sin(y / 40.0)
        patches = 1.0 + 0.6 * np.sin(y / rng.uniform(6.0, 15.0) + rng.uniform(0, 6.3))
        extent = 1.0 / (1.0 + np.exp(-(y + 50.0) / 5.0)) / (1.0 + np.exp((y - 120.0) / 10.0))
        organs += (
            rng.uniform(0.05, 0.5) * 6.0 * np.exp(-0.5 * ((x - xc) / 3.0) ** 2) * patches * extent
        ) * math.exp(-mu * 40.0)
    if st["geometry"] == "parallel" and rng.random() < 0.08:
        found["stomach"] = True
        centre = (rng.uniform(40, 90), rng.uniform(170, 230), 60.0)
        organs += rng.uniform(0.3, 1.5) * _ellipsoid_thickness(st, u, v, centre, (45, 35, 30))
    spectrum.add(organs, 0, 0, _fwhm(st, 30.0))
    found.update(_markers(rng, st, size, spectrum, signal))
    return found


def _markers(
    rng: np.random.Generator, st: dict[str, Any], size: int, spectrum: _Spectrum, signal: float
) -> dict[str, Any]:
    """Point sources, a ruler of dots or a line source on the skin (or just in front of it)."""
    kind = str(rng.choice(["none", "none", "notch", "chin", "side", "ruler", "line", "two"]))
    points: list[tuple[float, float]] = []
    if kind == "notch":
        points = [(rng.uniform(-4, 4), rng.uniform(45.0, 75.0))]
    elif kind == "chin":
        points = [(rng.uniform(-4, 4), -rng.uniform(80.0, 110.0))]
    elif kind == "side":
        points = [(-rng.uniform(55.0, 85.0), rng.uniform(-10.0, 10.0))]
    elif kind == "two":
        points = [
            (rng.uniform(-4, 4), rng.uniform(45.0, 75.0)),
            (rng.uniform(-4, 4), -rng.uniform(80.0, 110.0)),
        ]
    elif kind in ("ruler", "line"):
        n = int(rng.integers(5, 12)) if kind == "ruler" else 60
        step = 10.0 if kind == "ruler" else 1.0 * rng.uniform(0.8, 1.6)
        start = (rng.choice([-1, 1]) * rng.uniform(50.0, 80.0), -rng.uniform(20.0, 60.0))
        vertical = rng.random() < 0.7
        points = [
            (start[0] + (0 if vertical else i * step), start[1] + (i * step if vertical else 0))
            for i in range(n)
        ]
    if not points:
        return {"marker_kind": "none"}
    z = -rng.uniform(0.0, 8.0)
    strength = signal * float(np.exp(rng.uniform(math.log(0.003), math.log(0.05))))
    if kind == "line":
        strength /= 10.0
    img = np.zeros((size, size))
    pixel, half = st["pixel"], size / 2.0
    gain = 1.0 / _scale(st, z) ** 2  # pinhole sensitivity ~ 1/distance^2
    c, sn = math.cos(st["tilt"]), math.sin(st["tilt"])
    shown = 0
    for px, py in points:
        a, b = c * px - sn * py, sn * px + c * py
        s = _scale(st, z)
        col = int((a + st["centre"][0]) / s / pixel + half)
        row = int((b + st["centre"][1]) / s / pixel + half)
        if 0 <= row < size and 0 <= col < size:
            img[row, col] += strength * gain
            shown += 1
    spectrum.add(img, 0, 0, max(_fwhm(st, z), 1.0))
    return {"marker_kind": kind, "marker_points": shown}


def _detector(rng: np.random.Generator, st: dict[str, Any], size: int, img: np.ndarray) -> Any:
    """Pinhole field and vignetting, detector non-uniformity."""
    u, v = _image_grid(size, st["pixel"])
    flood = 1.0 + rng.uniform(0.0, 0.03) * np.cos(
        2 * math.pi * (u * rng.normal() + v * rng.normal()) / (st["fov"] * 0.7) + rng.uniform(0, 6)
    )
    img = img * flood
    if st["geometry"] == "pinhole":
        r = np.hypot(u, v)
        img = img * (1.0 + (r / st["d_mid"]) ** 2) ** -1.5 * (r <= st["field_radius"])
    return img


def _dataset(
    pixels: np.ndarray,
    spacing: float,
    seed: int,
    patient_id: str,
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> Dataset:
    """NM Image Storage in the "Cygnus Nuclear" style."""
    sop = _uid("sop", patient_id, seed)
    when = _dt.datetime(2024, 9, 2, 7, 45) + _dt.timedelta(
        days=int(seed % 400), minutes=int(rng.integers(0, 540))
    )
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = NM_IMAGE_STORAGE
    fm.MediaStorageSOPInstanceUID = sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 192" if rng.random() < 0.5 else "ISO_IR 100"
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.PatientName = f"CYG^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = f"{int(rng.integers(1940, 2005))}0101"
    ds.PatientSex = str(rng.choice(["F", "F", "F", "M"]))
    ds.StudyInstanceUID = _uid("study", patient_id, seed)
    ds.SeriesInstanceUID = _uid("series", patient_id, seed)
    acq = when + _dt.timedelta(minutes=int(rng.integers(15, 25)))
    ds.StudyDate = ds.SeriesDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = acq.strftime("%Y%m%d"), acq.strftime("%H%M%S")
    ds.AcquisitionDateTime = acq.strftime("%Y%m%d%H%M%S.000000")
    ds.AccessionNumber = f"CY{seed % 10**7:07d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{seed % 10**6}"
    ds.StudyDescription = "Thyroid Scan Tc99m"
    pin = meta["geometry"] == "pinhole"
    ds.SeriesDescription = (
        "Thyroid Anterior Pinhole" if pin else f"Thyroid Anterior {meta['collimator']}"
    )
    ds.ProtocolName = "THYROID_TC"
    ds.Modality = "NM"
    ds.SeriesNumber = int(rng.integers(100, 105))
    ds.InstanceNumber = 1
    ds.Manufacturer = "Cygnus Nuclear"
    ds.ManufacturerModelName = str(rng.choice(["Orion NM-3", "Orion XP"]))
    ds.StationName = f"CYG-NM{int(rng.integers(1, 4))}"
    ds.InstitutionName = "Synthetic C"
    ds.SoftwareVersions = "3.2.1"
    # without Body Part Examined dciodvfy asks for Laterality; this vendor always names one
    ds.BodyPartExamined = str(rng.choice(["THYROID", "NECK", "HEADNECK"]))
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    orient = _code("102538003", "SCT", "recumbent")
    orient.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "SCT", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orient])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "SCT", "headfirst")])
    ds.CountsAccumulated = int(pixels.sum())
    ds.AcquisitionTerminationCondition = str(rng.choice(["CNTS", "TIME"]))
    rows, cols = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16  # NM Image allows 8 or 16 only
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{spacing:.5f}", f"{spacing:.5f}"]
    if rng.random() < 0.5:
        ds.SmallestImagePixelValue = int(pixels.min())
        ds.LargestImagePixelValue = int(pixels.max())
    if rng.random() < 0.6:
        top = max(float(np.percentile(pixels, 99.9)), 1.0)
        ds.WindowCenter = f"{top / 2:.1f}"
        ds.WindowWidth = f"{top:.1f}"
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.EnergyWindowVector = [1]
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = [1]
    ds.NumberOfDetectors = 1
    ds.ActualFrameDuration = int(rng.integers(180, 600)) * 1000
    win = Dataset()
    band = Dataset()
    width = float(rng.choice([15.0, 20.0]))
    band.EnergyWindowLowerLimit = f"{140.5 * (1 - width / 200):.2f}"
    band.EnergyWindowUpperLimit = f"{140.5 * (1 + width / 200):.2f}"
    win.EnergyWindowRangeSequence = Sequence([band])
    win.EnergyWindowName = "Tc99m"
    ds.EnergyWindowInformationSequence = Sequence([win])
    ph = Dataset()
    ph.RadionuclideCodeSequence = Sequence([_code("44588005", "SCT", "Technetium^99m^")])
    ph.Radiopharmaceutical = "Tc-99m pertechnetate"
    ph.RadionuclideTotalDose = f"{rng.uniform(74.0, 185.0):.1f}"
    ds.RadiopharmaceuticalInformationSequence = Sequence([ph])
    det = Dataset()
    det.CollimatorGridName = meta["collimator"]
    det.CollimatorType = "PINH" if pin else "PARA"
    if pin:
        det.FocalDistance = [int(round(meta["focal_mm"]))]
    det.ZoomFactor = [f"{meta['zoom']:.3f}", f"{meta['zoom']:.3f}"]
    det.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    det.ImagePositionPatient = [f"{-cols * spacing / 2:.2f}", "0", f"{rows * spacing / 2:.2f}"]
    ds.DetectorInformationSequence = Sequence([det])
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _uid(*parts: object) -> UID:
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=["dicom-node-phantom-c", *map(str, parts)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_case(
    seed: int, size: int = 256, *, patient_id: str | None = None, anatomy_seed: int | None = None
) -> PhantomCase:
    """One family-C study; same signature and truth contract as families A and B.

    Parameters
    ----------
    seed : int
        Seeds what varies per study (collimator, field of view, position, blur, scatter,
        background, salivary activity, markers, counts, header).
    size : int
        Matrix size (rows = columns), a multiple of 4 and at least 32.
    patient_id : str, optional
        PatientID; default ``CYG-<anatomy_seed>``.
    anatomy_seed : int, optional
        Seeds the patient's 3-D anatomy (gland, nodules, salivary glands); default ``seed``.

    Returns
    -------
    PhantomCase

    Raises
    ------
    ValueError
        ``size`` below 32 or not a multiple of 4.
    """
    if size < 32 or size % 4:
        raise ValueError(f"size must be a multiple of 4 and at least 32, got {size!r}")
    anatomy_seed = seed if anatomy_seed is None else anatomy_seed
    anat = _anatomy(np.random.default_rng([anatomy_seed, 31]))
    rng = np.random.default_rng([seed, 32])
    st = _study(rng, anat, size)
    spectrum = _Spectrum(size, st["pixel"])
    thyroid, nodule, volume, signal = _gland_slabs(anat, st, size, spectrum)
    extra = _distractors(rng, anat, st, size, spectrum, signal)
    expected = _detector(
        rng, st, size, spectrum.image(st["scatter_fraction"], st["scatter_length"])
    )
    scale = st["total"] / max(float(expected.sum()), 1e-9)
    counts = np.clip(rng.poisson(expected * scale), 0, 65535).astype(np.uint16)
    patient_id = patient_id or f"CYG-{anatomy_seed:08d}"
    meta: dict[str, Any] = {
        "family": "C",
        "geometry": st["geometry"],
        "collimator": st["collimator"],
        "pixel_spacing_mm": round(st["pixel"], 5),
        "fov_mm": round(st["fov"], 2),
        "fwhm_mm": round(_fwhm(st, st["z_mid"]), 3),
        "focal_mm": st.get("focal", 0.0),
        "zoom": 400.0 / st["fov"] if st["geometry"] == "parallel" else 1.0,
        "habitus": anat["habitus"],
        "lobes": [
            {
                "side": "left" if lb["side"] > 0 else "right",
                "length_mm": round(2 * lb["half"], 1),
                "uptake": round(lb["uptake"], 3),
            }
            for lb in anat["lobes"]
        ],
        "single_lobe": anat["single_lobe"],
        "isthmus": anat["isthmus"] is not None,
        "pyramidal_lobe": anat["pyramidal"] is not None,
        "gland_volume_ml": round(volume, 2),
        "cold_nodules": anat["cold_meta"],
        "hot_nodules": anat["hot_meta"],
        "suppressed_gland": anat["suppressed"],
        "patchy_uptake": anat["patchy"],
        "mu_per_cm": round(st["mu"] * 10, 4),
        "scatter_fraction": round(st["scatter_fraction"], 3),
        "thyroid_to_background": round(st["tbr"], 2),
        "blood_pool": st["blood_pool"],
        **extra,
    }
    ds = _dataset(counts, st["pixel"], seed, patient_id, rng, meta)
    meta.update(
        {
            "seed": seed,
            "anatomy_seed": anatomy_seed,
            "size": size,
            "total_counts": int(counts.sum()),
            "patient_id": patient_id,
        }
    )
    return PhantomCase(dataset=ds, truth={"thyroid": thyroid, "nodule": nodule}, meta=meta)


def write_cases(
    out: Path | str, n: int, seed: int, size: int | list[int] = 256, progress: Any = None
) -> list[Path]:
    """Write ``n`` family-C studies to ``OUT/<case>/image.dcm`` + ``truth.npz``.

    Same layout, patient grouping and arguments as :func:`dicom_node.demo.phantoms.write_cases`;
    PatientIDs are prefixed ``C``.
    """
    folders = write_planned_cases(make_case, out, n, seed, size, progress, prefix="C")
    LOGGER.info("wrote %d family-C phantom studies to %s", n, out)
    return folders
