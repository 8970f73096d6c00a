"""Synthetic Tc-99m pertechnetate thyroid scintigraphy studies (planar NM, anterior pinhole view).

The generator builds the gland geometrically in millimetres (two lobes of unequal size and uptake,
an isthmus that is sometimes absent, sometimes a pyramidal lobe), punches cold nodules (labelled)
and hot nodules (not labelled) into it, adds salivary glands, a marker source and soft-tissue
background, blurs with the system point-spread function and draws Poisson counts. The result is a
one-frame NM Image Storage dataset with realistic headers plus the ground truth masks:

- ``thyroid``: the whole gland including every nodule;
- ``nodule``: cold nodules only.

Everything is numpy + pydicom (no torch): ``dicom-node demo`` uses it, and ``python -m training
phantoms`` wraps :func:`write_cases`. A case is fully determined by its seed.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

LOGGER = logging.getLogger(__name__)

NM_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.20")
"""SOP Class UID of NM Image Storage."""

SEGMENT_KEYS = ("thyroid", "nodule")
"""Keys of the truth masks, in output-channel order."""

_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; deterministic suffix from entropy


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic study.

    Attributes
    ----------
    dataset : pydicom.Dataset
        NM Image Storage instance (one frame, uint16 counts), ready to write.
    truth : dict[str, numpy.ndarray]
        Boolean masks ``(rows, cols)`` keyed by segment key (``thyroid``, ``nodule``).
    meta : dict
        Generation parameters (pixel spacing, counts, nodules, ...), JSON-serialisable.
    """

    dataset: Dataset
    truth: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- geometry helpers
def _smooth_radius(rng: np.random.Generator, amplitude: float, n_harmonics: int = 4) -> Any:
    """Return ``f(theta) -> 1 + small smooth perturbation`` (random low-order Fourier series)."""
    amps = rng.normal(0.0, amplitude, size=n_harmonics) / np.arange(1, n_harmonics + 1)
    phases = rng.uniform(0, 2 * np.pi, size=n_harmonics)

    def radius(theta: np.ndarray) -> np.ndarray:
        out = np.ones_like(theta)
        for k in range(n_harmonics):
            out = out + amps[k] * np.cos((k + 2) * theta + phases[k])
        return np.clip(out, 0.75, 1.25)

    return radius


def _ellipsoid(
    x: np.ndarray,
    y: np.ndarray,
    centre: tuple[float, float],
    half_axes: tuple[float, float],
    angle: float,
    radius: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask and projected thickness (0..1) of a perturbed ellipse; coordinates in mm."""
    cx, cy = centre
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - cx) * ca + (y - cy) * sa
    v = -(x - cx) * sa + (y - cy) * ca
    r = np.sqrt((u / half_axes[0]) ** 2 + (v / half_axes[1]) ** 2)
    if radius is not None:
        r = r / radius(np.arctan2(v / half_axes[1], u / half_axes[0]))
    mask = r < 1.0
    thick = np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0))
    return mask, thick


def _gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur through the FFT with zero padding (no wrap-around)."""
    if sigma_px <= 0:
        return img
    pad = int(np.ceil(4 * sigma_px)) + 2
    padded = np.pad(img, pad)
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(padded) * kernel, s=padded.shape)
    return np.clip(out[pad:-pad, pad:-pad], 0.0, None)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation."""
    noise = rng.normal(size=shape)
    out = _gaussian_blur(noise + 10.0, scale_px) - 10.0 * _gaussian_blur(np.ones(shape), scale_px)
    std = float(out.std()) or 1.0
    return (out - out.mean()) / std


# --------------------------------------------------------------------------- the phantom
# Every range below is documented in training/README.md ("Phantom family A"); change both together.
GEOMETRIES = ("pinhole", "parallel")
"""Collimators drawn per study: pinhole (magnified, sharper) or parallel-hole (wide field, blur)."""

NODULE_LOCATIONS = ("inside", "edge", "pole")
"""Where a nodule sits in its lobe: well inside, on the lateral/medial outline, at a pole."""


def _anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Patient-specific anatomy (shared by several studies of one patient)."""
    length = rng.uniform(30.0, 65.0)
    single = bool(rng.random() < 0.08)  # hemithyroidectomy: one lobe, no isthmus
    return {
        "lobe_length_mm": [length * rng.uniform(0.65, 1.0), length * rng.uniform(0.65, 1.0)],
        "lobe_width_ratio": [rng.uniform(0.25, 0.65), rng.uniform(0.25, 0.65)],
        "lobe_tilt_deg": [rng.uniform(-10, 25), rng.uniform(-10, 25)],
        "lobe_shift": rng.uniform(-0.15, 0.15),  # vertical offset between the lobes / length
        "gap_mm": rng.uniform(0.0, 22.0),
        "outline_amplitude": rng.uniform(0.02, 0.15),
        # projected-thickness profile of the lobes: floor + (1 - floor) * t**power, so edges
        # range from soft (ellipsoid) to a sharp step
        "edge_floor": float(rng.choice([0.0, rng.uniform(0.0, 0.6)])),
        "edge_power": rng.uniform(0.4, 2.0),
        "nodule_edge": rng.uniform(1.2, 8.0),  # 1.2 = soft rim, 8 = sharp
        "uptake_ratio": float(rng.uniform(0.4, 1.0)),  # weaker lobe / stronger lobe
        "weaker_lobe": int(rng.integers(0, 2)),
        "missing_lobe": int(rng.integers(0, 2)) if single else None,
        "isthmus": bool(rng.random() < 0.75) and not single,
        "isthmus_height_mm": rng.uniform(3.0, 25.0),
        "isthmus_uptake": rng.uniform(0.15, 1.0),
        "isthmus_level": rng.uniform(-0.05, 0.3),
        "pyramidal": bool(rng.random() < 0.2) and not single,
        "n_cold": int(rng.choice([0, 0, 1, 1, 1, 2, 2, 3, 4])),
        "n_hot": int(rng.choice([0, 0, 0, 0, 1, 1, 2])),
        "shape_seed": int(rng.integers(0, 2**31)),
    }


def _place_nodule(
    rng: np.random.Generator, lobe: dict[str, Any], diam: float, location: str
) -> tuple[float, float]:
    """Centre (lobe-local u along the length, v across) of a nodule at ``location``."""
    a, b, r = lobe["length"] / 2.0, lobe["width"] / 2.0, diam / 2.0
    if location == "inside":
        return (
            rng.uniform(-0.8, 0.8) * max(a - r, 0.0),
            rng.uniform(-0.8, 0.8) * max(b - r, 0.0),
        )
    if location == "pole":
        phi = rng.uniform(-0.35, 0.35) + float(rng.choice([0.0, np.pi]))
        depth = r * rng.uniform(0.2, 1.0)
    else:  # edge: anywhere on the outline, centre from just outside to well inside it
        phi = rng.uniform(0.0, 2.0 * np.pi)
        depth = r * rng.uniform(-0.3, 0.9)
    px, py = a * np.cos(phi), b * np.sin(phi)
    nx, ny = b * np.cos(phi), a * np.sin(phi)  # outward normal of the ellipse at phi
    norm = float(np.hypot(nx, ny)) or 1.0
    return px - depth * nx / norm, py - depth * ny / norm


def _render(
    rng: np.random.Generator, anatomy: dict[str, Any], size: int
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Expected counts (before noise), truth masks and generation metadata."""
    shape_rng = np.random.default_rng(anatomy["shape_seed"])
    present = [s for s in range(2) if s != anatomy["missing_lobe"]]
    lengths = list(anatomy["lobe_length_mm"])
    widths = [lengths[i] * anatomy["lobe_width_ratio"][i] for i in range(2)]
    geometry = GEOMETRIES[0] if rng.random() < 0.65 else GEOMETRIES[1]
    extent = (sum(widths) + anatomy["gap_mm"]) * 1.3
    if geometry == "pinhole":
        # magnification: the longer lobe spans 22-60% of the field
        spacing = max(lengths) / (rng.uniform(0.22, 0.6) * size)
        fwhm_mm = rng.uniform(0.5, 6.0)
    else:
        spacing = rng.uniform(120.0, 300.0) / size  # field of view 120-300 mm
        fwhm_mm = rng.uniform(2.5, 7.0)
    # ... but the whole gland stays within 80% of the field width
    spacing = max(spacing, extent / (0.8 * size), max(lengths) * 1.4 / (0.8 * size))
    half = size * spacing / 2.0
    coords = (np.arange(size) + 0.5) * spacing - half
    x, y = np.meshgrid(coords, coords)  # x: image columns (patient right on the left), y: down

    gx = rng.uniform(-0.12, 0.12) * half
    gy = rng.uniform(-0.12, 0.15) * half
    gland_angle = np.deg2rad(rng.uniform(-15, 15))
    ca, sa = np.cos(gland_angle), np.sin(gland_angle)

    def to_image(px: float, py: float) -> tuple[float, float]:
        return gx + px * ca - py * sa, gy + px * sa + py * ca

    thyroid = np.zeros((size, size), bool)
    thick = np.zeros((size, size))
    uptake = np.zeros((size, size))
    lobes: dict[int, dict[str, Any]] = {}
    floor, power = anatomy["edge_floor"], anatomy["edge_power"]
    for side in range(2):
        radius = _smooth_radius(shape_rng, anatomy["outline_amplitude"])
        if side not in present:
            continue
        sign = -1.0 if side == 0 else 1.0
        length, width = lengths[side], widths[side]
        shift = sign * anatomy["lobe_shift"] * length / 2
        cx, cy = to_image(sign * (anatomy["gap_mm"] / 2 + width / 2), -length * 0.12 + shift)
        tilt = sign * np.deg2rad(anatomy["lobe_tilt_deg"][side])
        angle = np.pi / 2 + gland_angle - tilt
        mask, t = _ellipsoid(x, y, (cx, cy), (length / 2, width / 2), angle, radius)
        t = np.where(mask, floor + (1.0 - floor) * t**power, 0.0)
        level = anatomy["uptake_ratio"] if side == anatomy["weaker_lobe"] else 1.0
        thyroid |= mask
        uptake = np.where(t > thick, level, uptake)
        thick = np.maximum(thick, t)
        lobes[side] = {
            "centre": (cx, cy),
            "angle": angle,
            "length": length,
            "width": width,
            "level": level,
        }
    if anatomy["isthmus"]:
        cx, cy = to_image(0.0, min(lengths) * anatomy["isthmus_level"])
        span = anatomy["gap_mm"] + widths[0] / 2 + widths[1] / 2
        mask, t = _ellipsoid(
            x, y, (cx, cy), (span / 2, anatomy["isthmus_height_mm"] / 2), gland_angle
        )
        t = t * anatomy["isthmus_uptake"]
        thyroid |= mask
        uptake = np.where(t > thick, 1.0, uptake)
        thick = np.maximum(thick, t)
    if anatomy["pyramidal"]:
        off = shape_rng.uniform(-0.5, 0.5) * anatomy["gap_mm"]
        plen = shape_rng.uniform(0.3, 0.7) * max(lengths)
        cx, cy = to_image(off, -plen / 2 + min(lengths) * 0.05)
        mask, t = _ellipsoid(
            x, y, (cx, cy), (plen / 2, shape_rng.uniform(2.0, 5.0)), np.pi / 2 + gland_angle
        )
        t = t * shape_rng.uniform(0.2, 0.7)
        thyroid |= mask
        uptake = np.where(t > thick, 1.0, uptake)
        thick = np.maximum(thick, t)

    activity = thick * uptake
    # heterogeneity of the parenchyma, from none to coarse
    activity *= 1.0 + rng.uniform(0.0, 0.2) * _smooth_field(
        rng, (size, size), rng.uniform(2.0, 8.0) / spacing
    )
    activity = np.clip(activity, 0.0, None)

    nodule = np.zeros((size, size), bool)
    nodules = []
    sides = sorted(lobes)
    for i in range(anatomy["n_cold"]):
        lobe = lobes[sides[i % len(sides)]]
        top = max(8.0, min(1.15 * lobe["width"], 0.85 * lobe["length"]))
        diam = float(shape_rng.uniform(5.0, top))  # small to lobe-filling
        location = str(shape_rng.choice(NODULE_LOCATIONS, p=[0.45, 0.35, 0.2]))
        bulge = location != "inside" and bool(shape_rng.random() < 0.6)
        u, v = _place_nodule(shape_rng, lobe, diam, location)
        ca2, sa2 = np.cos(lobe["angle"]), np.sin(lobe["angle"])
        ncx = lobe["centre"][0] + u * ca2 - v * sa2
        ncy = lobe["centre"][1] + u * sa2 + v * ca2
        mask, t = _ellipsoid(
            x,
            y,
            (ncx, ncy),
            (diam / 2, diam / 2 * shape_rng.uniform(0.6, 1.0)),
            shape_rng.uniform(0, np.pi),
            _smooth_radius(shape_rng, shape_rng.uniform(0.0, 0.1), 3),
        )
        residual = float(rng.uniform(0.0, 0.6))
        if bulge:  # the nodule pushes the outline out: its own (faint) tissue is gland too
            outside = mask & ~thyroid
            activity = np.where(outside, lobe["level"] * residual * t, activity)
            thyroid |= mask
        mask &= thyroid
        # the nodule replaces functioning tissue over (most of) the gland depth
        depth = np.clip(t * anatomy["nodule_edge"], 0.0, 1.0)
        activity = activity * (1.0 - (1.0 - residual) * depth * mask)
        nodule |= mask
        nodules.append(
            {
                "diameter_mm": round(diam, 2),
                "residual": round(residual, 3),
                "location": location,
                "bulge": bulge,
                "lobe_fill": round(diam / lobe["width"], 3),  # > 0.8: as wide as the lobe
                "centre_mm": [round(float(ncx), 2), round(float(ncy), 2)],
                "pixels": int(mask.sum()),
            }
        )
    hot = []
    peak_gland = float(activity.max()) or 1.0
    for _ in range(anatomy["n_hot"]):
        lobe = lobes[sides[int(shape_rng.integers(0, len(sides)))]]
        diam = float(shape_rng.uniform(5.0, max(6.0, min(25.0, lobe["width"]))))
        location = str(shape_rng.choice(NODULE_LOCATIONS[:2], p=[0.6, 0.4]))
        u, v = _place_nodule(shape_rng, lobe, diam, location)
        ca2, sa2 = np.cos(lobe["angle"]), np.sin(lobe["angle"])
        hcx = lobe["centre"][0] + u * ca2 - v * sa2
        hcy = lobe["centre"][1] + u * sa2 + v * ca2
        mask, t = _ellipsoid(x, y, (hcx, hcy), (diam / 2, diam / 2), 0.0)
        mask &= ~nodule
        if location == "inside":
            mask &= thyroid
        thyroid |= mask  # a hot nodule is gland, never `nodule` (cold only)
        gain = float(rng.uniform(1.3, 4.0))
        activity = activity + (gain - 1.0) * t * mask * peak_gland * 0.8
        hot.append({"diameter_mm": round(diam, 2), "gain": round(gain, 2), "location": location})

    peak = float(np.percentile(activity[thyroid], 95)) if thyroid.any() else 1.0
    extra = _hard_negatives(rng, x, y, thyroid, (gx, gy), max(lengths), half, peak)
    marker = extra.pop("marker")
    # soft-tissue background: neck outline with a gradient, sometimes the jugular blood pool
    neck_w = rng.uniform(35.0, 80.0)
    neck = 1.0 / (1.0 + np.exp((np.abs(x - gx) - neck_w) / rng.uniform(2.0, 8.0)))
    gradient = 1.0 + rng.uniform(-0.5, 0.5) * y / half
    background_level = float(np.exp(rng.uniform(np.log(0.003), np.log(0.3))))
    bg = neck * gradient * background_level * peak
    bg *= 1.0 + 0.15 * _smooth_field(rng, (size, size), 10.0 / spacing)
    if rng.random() < 0.3:
        for sign in (-1.0, 1.0):
            vx = gx + sign * (anatomy["gap_mm"] / 2 + max(widths) + rng.uniform(3.0, 15.0))
            vessel = np.exp(-0.5 * ((x - vx) / rng.uniform(2.0, 4.0)) ** 2)
            bg += vessel * rng.uniform(0.02, 0.15) * peak
    expected = extra["image"] + activity + np.clip(bg, 0.0, None) + 0.002 * peak

    sigma_px = fwhm_mm / 2.3548 / spacing
    expected = _gaussian_blur(expected, sigma_px)
    meta = {
        "family": "A",
        "geometry": geometry,
        "pixel_spacing_mm": round(float(spacing), 5),
        "fwhm_mm": round(float(fwhm_mm), 3),
        "background_level": round(float(background_level), 4),
        "single_lobe": anatomy["missing_lobe"] is not None,
        "isthmus": anatomy["isthmus"],
        "pyramidal_lobe": anatomy["pyramidal"],
        "uptake_ratio": round(float(anatomy["uptake_ratio"]), 3),
        "cold_nodules": nodules,
        "hot_nodules": hot,
        "salivary_glands": extra["salivary"],
        "marker_mm": marker,
    }
    return expected, {"thyroid": thyroid, "nodule": nodule}, meta


def _hard_negatives(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    thyroid: np.ndarray,
    gland: tuple[float, float],
    length: float,
    half: float,
    peak: float,
) -> dict[str, Any]:
    """Salivary glands and marker sources: bright, gland-like, never thyroid in the truth."""
    gx, gy = gland
    image = np.zeros(x.shape)
    top = gy - length * 0.5
    salivary = 0
    if rng.random() < 0.85:  # submandibular glands, from far above to close to the upper poles
        for sign in (-1.0, 1.0):
            if rng.random() < 0.1:
                continue
            sx = gx + sign * rng.uniform(18.0, 50.0)
            sy = top - rng.uniform(5.0, 45.0)
            _, t = _ellipsoid(
                x,
                y,
                (sx, sy),
                (rng.uniform(6, 18), rng.uniform(5, 13)),
                rng.uniform(-0.8, 0.8),
                _smooth_radius(rng, 0.1, 3),
            )
            image += t * rng.uniform(0.05, 1.0) * peak
            salivary += 1
            if rng.random() < 0.5:  # parotid: larger, higher and more lateral
                _, t = _ellipsoid(
                    x,
                    y,
                    (sx + sign * rng.uniform(10, 30), sy - rng.uniform(20, 50)),
                    (rng.uniform(10, 20), rng.uniform(12, 25)),
                    rng.uniform(-0.4, 0.4),
                    _smooth_radius(rng, 0.1, 3),
                )
                image += t * rng.uniform(0.05, 0.7) * peak
                salivary += 1
    marker = []
    for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))):
        for _attempt in range(6):  # a marker lies on the skin, never over the gland itself
            where = rng.random()
            if where < 0.5:  # sternal notch
                mx, my = gx + rng.uniform(-0.2, 0.2) * half, gy + length * rng.uniform(0.55, 1.0)
            elif where < 0.7:  # chin
                mx, my = gx + rng.uniform(-0.2, 0.2) * half, gy - length * rng.uniform(0.9, 1.5)
            else:  # anywhere (side markers, contamination)
                mx, my = gx + rng.uniform(-0.85, 0.85) * half, gy + rng.uniform(-0.85, 0.85) * half
            col = int(np.argmin(np.abs(x[0] - mx)))
            row = int(np.argmin(np.abs(y[:, 0] - my)))
            if not thyroid[row, col]:
                break
        else:
            continue
        if rng.random() < 0.25:  # a short line source (catheter, ruler)
            _, t = _ellipsoid(
                x, y, (mx, my), (rng.uniform(3.0, 12.0), rng.uniform(0.7, 1.5)), rng.uniform(0, 3)
            )
        else:
            r = rng.uniform(0.8, 3.0)
            _, t = _ellipsoid(x, y, (mx, my), (r, r), 0.0)
        image += t * rng.uniform(0.5, 8.0) * peak
        marker.append([round(float(mx), 2), round(float(my), 2)])
    return {"image": image, "salivary": salivary, "marker": marker or None}


def _uid(*parts: object) -> UID:
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=["dicom-node-phantom", *map(str, parts)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _nm_dataset(
    counts: np.ndarray,
    spacing: float,
    seed: int,
    patient_id: str,
    rng: np.random.Generator,
    geometry: str = "pinhole",
) -> Dataset:
    """Wrap a uint16 count image in an NM Image Storage dataset with realistic headers."""
    study_uid = _uid("study", patient_id, seed)
    series_uid = _uid("series", patient_id, seed)
    sop_uid = _uid("sop", patient_id, seed)
    base = _dt.datetime(2026, 1, 5, 8, 0) + _dt.timedelta(
        days=int(seed % 300), minutes=int(rng.integers(0, 480))
    )
    date, time = base.strftime("%Y%m%d"), base.strftime("%H%M%S")
    injected = base - _dt.timedelta(minutes=int(rng.integers(15, 30)))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NM_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # patient
    ds.PatientName = f"Phantom^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = f"{1940 + int(rng.integers(0, 60))}0101"
    ds.PatientSex = str(rng.choice(["F", "F", "F", "M"]))
    ds.PatientWeight = str(int(rng.integers(50, 110)))
    # study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.AccessionNumber = "A" + study_uid[-10:].replace(".", "")
    ds.ReferringPhysicianName = ""
    ds.StudyID = str(seed % 100000)
    ds.StudyDescription = "Thyroid scintigraphy Tc-99m"
    # series
    ds.Modality = "NM"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = (
        "Thyroid anterior pinhole" if geometry == "pinhole" else "Thyroid anterior LEHR"
    )
    ds.BodyPartExamined = "THYROID"
    ds.PatientOrientationCodeSequence = Sequence([_code("102538003", "SCT", "recumbent")])
    ds.PatientOrientationCodeSequence[0].PatientOrientationModifierCodeSequence = Sequence(
        [_code("40199007", "SCT", "supine")]
    )
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "SCT", "headfirst")])
    # equipment
    ds.Manufacturer = "dicom-node phantoms"
    ds.InstitutionName = "Synthetic"
    ds.StationName = "PHANTOM"
    ds.ManufacturerModelName = "ThyroPhantom"
    ds.SoftwareVersions = "1"
    # general image
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # anterior view: image left = patient right
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.LossyImageCompression = "00"
    # image pixel / NM image pixel
    rows, cols = counts.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.SmallestImagePixelValue = int(counts.min())
    ds.LargestImagePixelValue = int(counts.max())
    # multi-frame / NM multi-frame
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.EnergyWindowVector = [1]
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = [1]
    ds.NumberOfDetectors = 1
    # NM image
    ds.ActualFrameDuration = int(rng.integers(5, 16)) * 60000
    ds.CountsAccumulated = int(counts.sum())
    # NM isotope
    window = Dataset()
    rng_item = Dataset()
    rng_item.EnergyWindowLowerLimit = "126"
    rng_item.EnergyWindowUpperLimit = "154"
    window.EnergyWindowRangeSequence = Sequence([rng_item])
    window.EnergyWindowName = "Tc99m 140keV"
    ds.EnergyWindowInformationSequence = Sequence([window])
    pharm = Dataset()
    pharm.RadionuclideCodeSequence = Sequence([_code("44588005", "SCT", "Technetium^99m^")])
    pharm.Radiopharmaceutical = "Tc-99m pertechnetate"
    pharm.RadiopharmaceuticalStartTime = injected.strftime("%H%M%S")
    pharm.RadionuclideTotalDose = str(int(rng.integers(40, 120)))
    pharm.RadiopharmaceuticalRoute = "Intravenous"
    ds.RadiopharmaceuticalInformationSequence = Sequence([pharm])
    # NM detector
    det = Dataset()
    det.CollimatorGridName = "PINHOLE" if geometry == "pinhole" else "LEHR"
    det.CollimatorType = "PINH" if geometry == "pinhole" else "PARA"
    det.FieldOfViewShape = "ROUND"
    det.FieldOfViewDimensions = [int(round(rows * spacing))]
    det.ZoomFactor = [f"{1.0:.1f}", f"{1.0:.1f}"]
    det.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    det.ImagePositionPatient = [f"{-cols * spacing / 2:.3f}", "0", f"{rows * spacing / 2:.3f}"]
    det.ViewCodeSequence = Sequence([_code("399348003", "SCT", "anterior-posterior")])
    ds.DetectorInformationSequence = Sequence([det])
    ds.PixelData = counts.astype("<u2").tobytes()
    return ds


def make_case(
    seed: int, size: int = 256, *, patient_id: str | None = None, anatomy_seed: int | None = None
) -> PhantomCase:
    """Generate one synthetic thyroid scintigraphy study.

    Parameters
    ----------
    seed : int
        Seeds everything that varies from study to study (magnification, counts, blur, background,
        nodule contrast); the same seed gives the same bytes.
    size : int
        Matrix size (rows = columns), typically 256 or 128.
    patient_id : str, optional
        PatientID to write; default ``PHANTOM-<anatomy_seed>``.
    anatomy_seed : int, optional
        Seeds the patient's anatomy (gland shape, nodules); several studies of one patient share
        it. Defaults to ``seed``.

    Returns
    -------
    PhantomCase
        Dataset, truth masks (``thyroid`` includes nodules, ``nodule`` = cold nodules only) and
        generation metadata.

    Raises
    ------
    ValueError
        If ``size`` is smaller than 32.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size!r}")
    anatomy_seed = seed if anatomy_seed is None else anatomy_seed
    anatomy = _anatomy(np.random.default_rng([anatomy_seed, 1]))
    rng = np.random.default_rng([seed, 2])
    expected, truth, meta = _render(rng, anatomy, size)
    total = float(np.exp(rng.uniform(np.log(2e4), np.log(1e6))))  # low to high counts
    counts = rng.poisson(expected * (total / expected.sum()))
    counts = np.clip(counts, 0, 65535).astype(np.uint16)
    if patient_id is None:
        patient_id = f"PHANTOM-{anatomy_seed:08d}"
    spacing = meta["pixel_spacing_mm"]
    ds = _nm_dataset(counts, spacing, seed, patient_id, rng, meta["geometry"])
    meta.update(
        {
            "seed": seed,
            "anatomy_seed": anatomy_seed,
            "size": size,
            "total_counts": int(counts.sum()),
            "patient_id": patient_id,
        }
    )
    return PhantomCase(dataset=ds, truth=truth, meta=meta)


def plan_cases(n: int, seed: int) -> list[dict[str, Any]]:
    """Assign ``n`` studies to patients (1-3 studies each), deterministically from ``seed``.

    Returns a list of ``{"case", "seed", "anatomy_seed", "patient_id"}``.
    """
    rng = np.random.default_rng([seed, 0])
    plan: list[dict[str, Any]] = []
    patient = 0
    while len(plan) < n:
        anatomy_seed = int(seed * 100_003 + patient) % (2**31)
        patient_id = f"PH{seed % 10**5:05d}-{patient:04d}"
        studies = int(rng.choice([1, 1, 1, 2, 2, 3]))
        for s in range(studies):
            if len(plan) >= n:
                break
            k = len(plan)
            plan.append(
                {
                    "case": f"case{k:04d}",
                    "seed": int(seed * 1_000_003 + k) % (2**31),
                    "anatomy_seed": anatomy_seed,
                    "patient_id": patient_id,
                    "study": s,
                }
            )
        patient += 1
    return plan


def write_case(case: PhantomCase, folder: Path) -> Path:
    """Write ``image.dcm`` and ``truth.npz`` of one case into ``folder``; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    case.dataset.save_as(folder / "image.dcm", enforce_file_format=True)
    # numpy's stub fears a key named "allow_pickle" in the dict; the keys are SEGMENT_KEYS
    np.savez_compressed(folder / "truth.npz", **case.truth)  # type: ignore[arg-type]
    return folder


def write_cases(
    out: Path | str,
    n: int,
    seed: int,
    size: int | list[int] = 256,
    progress: Any = None,
    family: str = "A",
) -> list[Path]:
    """Write ``n`` phantom studies to ``OUT/<case>/image.dcm`` + ``truth.npz``.

    Parameters
    ----------
    out : path
        Output folder (created).
    n : int
        Number of studies.
    seed : int
        Master seed; case seeds and patient assignment derive from it.
    size : int or list of int
        Matrix size, or a list of sizes to draw from per case (e.g. ``[256, 128]``).
    progress : callable, optional
        Called with the number of cases done after each case.
    family : str
        ``"A"`` (this module, the training style), ``"B"``
        (:mod:`dicom_node.demo.phantoms_alt`, the independent held-out style), ``"C"``
        (:mod:`dicom_node.demo.phantoms_c`, a third independent style for reporting only, never
        trained on), ``"D"`` (:mod:`dicom_node.demo.phantoms_d`, a fourth independent style for
        reporting only, never trained on) or ``"classic"``
        (:mod:`dicom_node.demo.phantoms_classic`, the generator before issue 13).

    Returns
    -------
    list of Path
        The case folders, in order.

    Raises
    ------
    ValueError
        ``n`` below 1 or an unknown ``family``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n!r}")
    if family == "B":
        from dicom_node.demo import phantoms_alt  # imports this module: no import cycle at load

        return phantoms_alt.write_cases(out, n, seed, size, progress)
    if family == "C":
        from dicom_node.demo import phantoms_c  # reporting only, never trained on

        return phantoms_c.write_cases(out, n, seed, size, progress)
    if family == "D":
        from dicom_node.demo import phantoms_d  # reporting only, never trained on

        return phantoms_d.write_cases(out, n, seed, size, progress)
    if family == "classic":
        from dicom_node.demo import phantoms_classic

        return phantoms_classic.write_cases(out, n, seed, size, progress)
    if family != "A":
        raise ValueError(f"family must be 'A', 'B', 'C', 'D' or 'classic', got {family!r}")
    folders = write_planned_cases(make_case, out, n, seed, size, progress)
    LOGGER.info("wrote %d phantom studies to %s", n, out)
    return folders


def write_planned_cases(
    make: Callable[..., PhantomCase],
    out: Path | str,
    n: int,
    seed: int,
    size: int | list[int] = 256,
    progress: Any = None,
    prefix: str = "",
) -> list[Path]:
    """Write the :func:`plan_cases` studies of a family's ``make(seed, size, *, patient_id,
    anatomy_seed)``; PatientIDs get ``prefix`` (one layout and patient grouping for all)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n!r}")
    out = Path(out)
    sizes = [size] if isinstance(size, int) else list(size)
    folders = []
    for i, item in enumerate(plan_cases(n, seed)):
        case = make(
            item["seed"],
            sizes[item["seed"] % len(sizes)],
            patient_id=prefix + item["patient_id"],
            anatomy_seed=item["anatomy_seed"],
        )
        folders.append(write_case(case, out / item["case"]))
        if progress is not None:
            progress(i + 1)
    return folders
