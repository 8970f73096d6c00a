"""Phantom family B: thyroid scintigraphy studies built with models independent of family A.

:mod:`dicom_node.demo.phantoms` (family A) is what the shipped model trains on. This module is
the held-out *style* used for validation and reporting: every model in it is a different one, so
a model that only learnt family A's habits (ellipse outlines, its thickness profile, its Gaussian
blur, its header) is caught here rather than on patients.

=====================  =========================================  ==================================
aspect                 family A (``phantoms``)                    family B (this module)
=====================  =========================================  ==================================
lobe shape             perturbed ellipse                          disc swept along a curved centre
                                                                  line, radius profile along it
edge / depth profile   ellipsoid thickness ``floor + t**p``       exponential rise from the outline
nodules                perturbed ellipses, placed by location     superellipses or lumpy unions,
                                                                  placed at a random gland point
blur                   one Gaussian                               Gaussian core + broad tail
                                                                  (septal penetration) + scatter
sampling               point sampled on the final grid            rendered 2x finer, box-binned;
                                                                  some 256 studies acquired at 128
noise                  Poisson                                    Poisson + scatter; byte mode
header                 "dicom-node phantoms", pinhole/LEHR        another vendor, its own naming
=====================  =========================================  ==================================

Truth: ``thyroid`` = the gland (signed distance < 0, at least half of a pixel's sub-samples),
nodules and bulges included; ``nodule`` = cold nodules inside it. Every range is documented in
``training/README.md`` ("Phantom family B").
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.demo.phantoms import NM_IMAGE_STORAGE, PhantomCase, write_planned_cases

LOGGER = logging.getLogger(__name__)

_UID_ROOT = "1.2.826.0.1.3680043.8.498."
_OVERSAMPLE = 2  # sub-samples per pixel side
_MARGIN_MM = 15.0  # signed distances are exact up to this far outside a shape


# --------------------------------------------------------------------------- signed distances
def _sd_swept(x: np.ndarray, y: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Signed distance (mm, < 0 inside) to a union of discs ``centres`` (N, 2), ``radii`` (N,).

    Computed in the discs' bounding box plus ``_MARGIN_MM``; farther pixels get the margin (all
    users only need "how far inside" and "clearly outside").
    """
    out = np.full(x.shape, _MARGIN_MM)
    lo = centres.min(axis=0) - radii.max() - _MARGIN_MM
    hi = centres.max(axis=0) + radii.max() + _MARGIN_MM
    cols = np.flatnonzero((x[0] >= lo[0]) & (x[0] <= hi[0]))
    rows = np.flatnonzero((y[:, 0] >= lo[1]) & (y[:, 0] <= hi[1]))
    if not len(cols) or not len(rows):
        return out
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    bx, by = x[box], y[box]
    part = np.full(bx.shape, _MARGIN_MM)
    for (cx, cy), r in zip(centres, radii, strict=True):
        np.minimum(part, np.hypot(bx - cx, by - cy) - r, out=part)
    out[box] = part
    return out


def _sd_superellipse(
    x: np.ndarray,
    y: np.ndarray,
    centre: tuple[float, float],
    half: tuple[float, float],
    angle: float,
    exponent: float,
) -> np.ndarray:
    """Approximate signed distance (mm) to a rotated superellipse ``|u/a|^n + |v/b|^n = 1``."""
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - centre[0]) * ca + (y - centre[1]) * sa
    v = -(x - centre[0]) * sa + (y - centre[1]) * ca
    level = (np.abs(u / half[0]) ** exponent + np.abs(v / half[1]) ** exponent) ** (1 / exponent)
    return (level - 1.0) * min(half)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    s = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2


# --------------------------------------------------------------------------- blur and noise
def _psf_blur(img: np.ndarray, core_px: float, tail_px: float, tail_weight: float) -> np.ndarray:
    """Blur with a Gaussian core plus a broad Gaussian tail, by FFT with zero padding."""
    pad = int(np.ceil(3 * max(core_px, tail_px))) + 2
    padded = np.pad(img, pad)
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    f2 = fx**2 + fy**2
    kernel = (1 - tail_weight) * np.exp(-2.0 * (np.pi * core_px) ** 2 * f2) + tail_weight * np.exp(
        -2.0 * (np.pi * tail_px) ** 2 * f2
    )
    out = np.fft.irfft2(np.fft.rfft2(padded) * kernel, s=padded.shape)
    return np.clip(out[pad:-pad, pad:-pad], 0.0, None)


def _bin(img: np.ndarray, k: int) -> np.ndarray:
    """Sum ``k x k`` blocks (a detector pixel integrates its area)."""
    h, w = img.shape
    return img.reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def _lumps(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Multiplicative texture: a sum of random Gaussian lumps, mean 1."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros(shape)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.02, 0.08) * h
        out += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    spread = float(np.abs(out).max()) or 1.0
    return 1.0 + out / spread


# --------------------------------------------------------------------------- anatomy
def _patient(rng: np.random.Generator) -> dict[str, Any]:
    """Anatomy of one patient (shared by the patient's studies)."""
    return {
        "height_mm": rng.uniform(28.0, 70.0),
        "lobes": int(rng.choice([2] * 11 + [1])),  # about 1 in 12 after hemithyroidectomy
        "kept": int(rng.integers(0, 2)),
        "size_ratio": rng.uniform(0.55, 1.0),  # smaller lobe / larger lobe
        "bow": rng.uniform(-0.35, 0.35),  # centre-line curvature / height
        "spread_mm": rng.uniform(6.0, 32.0),  # distance of the lobes' centre lines
        "radius_frac": rng.uniform(0.12, 0.34),  # maximum lobe half-width / height
        "taper": rng.uniform(0.3, 1.2),  # radius profile sin(pi s)**taper
        "pole_bias": rng.uniform(-0.4, 0.4),  # heavier lower (+) or upper (-) pole
        "isthmus_mm": float(rng.choice([0.0, rng.uniform(1.5, 12.0)], p=[0.3, 0.7])),
        "isthmus_level": rng.uniform(0.45, 0.85),
        "pyramidal": bool(rng.random() < 0.15),
        "rise_mm": rng.uniform(0.4, 6.0),  # edge: activity rises as 1 - exp(-depth / rise)
        "cold": int(rng.choice([0, 1, 1, 2, 2, 3, 5], p=[0.2, 0.25, 0.15, 0.15, 0.1, 0.1, 0.05])),
        "hot": int(rng.choice([0, 1, 2], p=[0.7, 0.22, 0.08])),
        "esophagus": bool(rng.random() < 0.25),
        "seed": int(rng.integers(0, 2**31)),
    }


def _lobe_discs(
    rng: np.random.Generator, p: dict[str, Any], side: int, origin: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Centre line points and radii of one lobe (mm, image frame)."""
    scale = 1.0 if side == 0 else p["size_ratio"]
    if rng.random() < 0.5:
        scale = p["size_ratio"] if side == 0 else 1.0
    height = p["height_mm"] * (0.75 + 0.25 * scale)
    sign = -1.0 if side == 0 else 1.0
    ox, oy = origin
    top = np.array([ox + sign * p["spread_mm"] * rng.uniform(0.4, 0.8), oy - height / 2])
    bottom = np.array([ox + sign * p["spread_mm"] * rng.uniform(0.5, 1.0), oy + height / 2])
    mid = (top + bottom) / 2 + np.array([sign * p["bow"] * height, 0.0])
    centres = _bezier(top, mid, bottom, 28)
    s = np.linspace(0.02, 0.98, 28)
    r_max = p["radius_frac"] * p["height_mm"] * scale * rng.uniform(0.85, 1.15)
    radii = r_max * np.sin(np.pi * s) ** p["taper"] * (1 + p["pole_bias"] * (s - 0.5))
    return centres, np.maximum(radii, 0.5)


def _render(
    rng: np.random.Generator, p: dict[str, Any], size: int
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Expected counts on the final grid, truth masks, metadata."""
    srng = np.random.default_rng(p["seed"])
    parallel = bool(rng.random() < 0.4)
    # field of view: pinhole magnifies (gland fills 30-75% of the field height)
    fov = p["height_mm"] / rng.uniform(0.3, 0.75) if not parallel else rng.uniform(130.0, 320.0)
    fov = max(fov, 2.2 * (p["spread_mm"] + p["radius_frac"] * p["height_mm"] * 2))
    spacing = fov / size
    n = size * _OVERSAMPLE
    sub = (np.arange(n) + 0.5) * (fov / n) - fov / 2
    x, y = np.meshgrid(sub, sub)
    origin = (rng.uniform(-0.1, 0.1) * fov, rng.uniform(-0.1, 0.12) * fov)
    # a slight rotation of the whole neck
    theta = np.deg2rad(rng.uniform(-12, 12))
    xr = origin[0] + (x - origin[0]) * np.cos(theta) + (y - origin[1]) * np.sin(theta)

    def image_frame(pts: np.ndarray) -> np.ndarray:
        """Points of the neck's (rotated) frame in image coordinates."""
        d = pts - np.array(origin)
        c, s_ = np.cos(theta), np.sin(theta)
        return np.array(origin) + np.stack(
            [d[:, 0] * c - d[:, 1] * s_, d[:, 0] * s_ + d[:, 1] * c], 1
        )

    sides = [0, 1] if p["lobes"] == 2 else [p["kept"]]
    sd = np.full(x.shape, np.inf)
    lobe_parts = []
    for side in (0, 1):
        centres, radii = _lobe_discs(srng, p, side, origin)
        if side in sides:
            sd = np.minimum(sd, _sd_swept(x, y, image_frame(centres), radii))
            lobe_parts.append((centres, radii))
    if p["lobes"] == 2 and p["isthmus_mm"] > 0:
        k = int(p["isthmus_level"] * 27)
        a, b = lobe_parts[0][0][k], lobe_parts[1][0][k]
        band = _bezier(a, (a + b) / 2 + np.array([0.0, srng.uniform(-4, 4)]), b, 32)
        sd = np.minimum(sd, _sd_swept(x, y, image_frame(band), np.full(32, p["isthmus_mm"] / 2)))
        if p["pyramidal"]:
            base = (a + b) / 2 + np.array([srng.uniform(-5, 5), 0.0])
            tip = base - np.array([srng.uniform(-6, 6), p["height_mm"] * srng.uniform(0.3, 0.6)])
            line = _bezier(base, (base + tip) / 2, tip, 24)
            sd = np.minimum(sd, _sd_swept(x, y, image_frame(line), np.linspace(2.5, 1.0, 24)))
    inside = sd < 0
    gland_pts = np.argwhere(inside)

    uptake = np.ones(x.shape)
    if p["lobes"] == 2:  # the weaker lobe: a smooth left-right ramp of function
        ramp = np.clip((xr - origin[0]) / max(p["spread_mm"], 1.0), -1, 1)
        uptake *= 1.0 + rng.uniform(-0.35, 0.35) * ramp
    uptake *= _lumps(rng, x.shape, int(rng.integers(0, 12))) ** rng.uniform(0.0, 0.3)

    cold_sd = []
    nodules: list[dict[str, Any]] = []
    extra_gland = np.full(x.shape, np.inf)
    for _ in range(p["cold"] + p["hot"]):
        if not len(gland_pts):
            break
        cy, cx = gland_pts[int(srng.integers(0, len(gland_pts)))]
        centre = (float(x[cy, cx]), float(y[cy, cx]))
        # log-uniform from 6.5 mm (about planar scintigraphy's limit) to most of the gland's height
        d = float(np.exp(srng.uniform(np.log(6.5), np.log(p["height_mm"] * 0.8))))
        half = (d / 2, d / 2 * srng.uniform(0.55, 1.0))
        if srng.random() < 0.7:
            nsd = _sd_superellipse(x, y, centre, half, srng.uniform(0, np.pi), srng.uniform(1.6, 4))
        else:  # lumpy: two or three overlapping discs
            k = int(srng.integers(2, 4))
            pts = np.array(centre) + srng.normal(0, d / 5, size=(k, 2))
            nsd = _sd_swept(x, y, pts, srng.uniform(0.3, 0.5, size=k) * d)
        if srng.random() < 0.5:  # the nodule deforms the outline
            extra_gland = np.minimum(extra_gland, nsd)
        cold = len(nodules) < p["cold"]
        nodules.append({"cold": cold, "diameter_mm": round(d, 2), "centre_mm": centre})
        cold_sd.append((nsd, cold, rng.uniform(0.0, 0.65), rng.uniform(0.3, 3.0)))
    sd = np.minimum(sd, extra_gland)
    depth = np.clip(-sd, 0.0, None)
    activity = uptake * (1.0 - np.exp(-depth / p["rise_mm"])) * (sd < 0)
    nodule_sub = np.zeros(x.shape, bool)
    for nsd, cold, residual, width in cold_sd:
        profile = 1.0 / (1.0 + np.exp(np.clip(nsd / (width / 4), -50, 50)))  # smooth step, 1 inside
        if cold:
            activity *= 1.0 - (1.0 - residual) * profile
            nodule_sub |= (nsd < 0) & (sd < 0)
        else:
            activity *= 1.0 + rng.uniform(0.6, 3.5) * profile
    for item in nodules:
        item["centre_mm"] = [round(v, 2) for v in item["centre_mm"]]

    peak = float(np.percentile(activity[sd < 0], 95)) if (sd < 0).any() else 1.0
    other = _distractors(rng, x, y, origin, p, peak, sd)
    # body: neck cylinder, chest below, scatter of everything
    neck_half = rng.uniform(40.0, 75.0)
    body = np.clip(1.0 - (np.abs(x - origin[0]) / neck_half) ** 4, 0.0, 1.0)
    body = body * (1.0 + rng.uniform(0.0, 1.5) * np.clip((y - origin[1]) / fov, 0.0, None))
    truth_activity = activity + other
    bg_level = float(np.exp(rng.uniform(np.log(0.002), np.log(0.25))))
    expected = truth_activity + body * bg_level * peak
    core = rng.uniform(1.0, 7.5) / 2.3548 / (fov / n)
    blurred = _psf_blur(expected, core, core * rng.uniform(3, 6), rng.uniform(0.0, 0.15))
    scatter = rng.uniform(0.05, 0.3)
    blurred = (1 - scatter) * blurred + scatter * _psf_blur(expected, 12.0 / (fov / n), 1, 0)
    image = _bin(blurred, _OVERSAMPLE)
    acquired = size
    if size >= 256 and rng.random() < 0.2:  # acquired at half the matrix, stored zoomed
        acquired = size // 2
        image = np.kron(_bin(image, 2), np.ones((2, 2)))
    thyroid = _bin((sd < 0).astype(float), _OVERSAMPLE) >= 0.5
    nodule = (_bin(nodule_sub.astype(float), _OVERSAMPLE) >= 0.5) & thyroid
    meta = {
        "family": "B",
        "geometry": "parallel" if parallel else "pinhole",
        "pixel_spacing_mm": round(float(spacing), 5),
        "fwhm_mm": round(float(core * 2.3548 * fov / n), 3),
        "acquired_matrix": acquired,
        "lobes": len(sides),
        "cold_nodules": [n_ for n_ in nodules if n_["cold"]],
        "hot_nodules": [n_ for n_ in nodules if not n_["cold"]],
        "background_level": round(bg_level, 4),
    }
    return image, {"thyroid": thyroid, "nodule": nodule}, meta


def _distractors(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    origin: tuple[float, float],
    p: dict[str, Any],
    peak: float,
    gland_sd: np.ndarray,
) -> np.ndarray:
    """Salivary glands, swallowed activity in the oesophagus, markers: never thyroid."""
    out = np.zeros(x.shape)
    ox, oy = origin
    for sign in (-1.0, 1.0):
        for _ in range(int(rng.choice([0, 1, 1, 2]))):
            c = (ox + sign * rng.uniform(15, 60), oy - p["height_mm"] / 2 - rng.uniform(0, 70))
            half = (rng.uniform(5, 20), rng.uniform(4, 16))
            sd = _sd_superellipse(x, y, c, half, rng.uniform(-1, 1), rng.uniform(1.5, 3))
            out += (1 - np.exp(-np.clip(-sd, 0, None) / 3.0)) * rng.uniform(0.05, 1.1) * peak
    if p["esophagus"]:  # a vertical streak behind the gland, usually left of the midline
        ex = ox + rng.uniform(-8, 3)
        streak = np.exp(-0.5 * ((x - ex) / rng.uniform(2, 5)) ** 2)
        streak *= rng.uniform(0.05, 0.4) * (1 + 0.5 * np.sin(y / rng.uniform(5, 15)))
        out += streak * peak
    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 4]))):
        for _attempt in range(8):
            mx = ox + rng.uniform(-0.45, 0.45) * float(np.ptp(x))
            my = oy + rng.uniform(-0.45, 0.45) * float(np.ptp(y))
            j = int(np.argmin(np.abs(x[0] - mx)))
            i = int(np.argmin(np.abs(y[:, 0] - my)))
            if gland_sd[i, j] > 4.0:
                break
        else:
            continue
        r = rng.uniform(0.6, 2.5)
        blob = np.hypot(x - mx, y - my) < r
        if rng.random() < 0.3:  # a cross-shaped marker
            blob = ((np.abs(x - mx) < r) & (np.abs(y - my) < 4 * r)) | (
                (np.abs(y - my) < r) & (np.abs(x - mx) < 4 * r)
            )
        out += blob * rng.uniform(0.3, 10.0) * peak
    return out


# --------------------------------------------------------------------------- DICOM
def _uid(*parts: object) -> UID:
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=["dicom-node-phantom-b", *map(str, parts)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dataset(
    pixels: np.ndarray,
    spacing: float,
    seed: int,
    patient_id: str,
    rng: np.random.Generator,
    meta: dict[str, Any],
) -> Dataset:
    """NM Image Storage in another vendor's style (naming, byte mode, fewer optional fields)."""
    sop = _uid("sop", patient_id, seed)
    when = _dt.datetime(2025, 3, 1, 7, 30) + _dt.timedelta(hours=int(seed % 5000))
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = NM_IMAGE_STORAGE
    fm.MediaStorageSOPInstanceUID = sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.PatientName = f"ALT^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = str(rng.choice(["F", "M", "O"]))
    ds.StudyInstanceUID = _uid("study", patient_id, seed)
    ds.SeriesInstanceUID = _uid("series", patient_id, seed)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S.%f")[:13]
    ds.AccessionNumber = f"B{seed % 10**8:08d}"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StudyID = "THY"
    ds.StudyDescription = "NM THYROID"
    ds.SeriesDescription = "TC THYROID ANT " + ("LEAP" if meta["geometry"] == "parallel" else "PH")
    ds.Modality = "NM"
    ds.SeriesNumber = int(rng.integers(1, 9))
    ds.InstanceNumber = int(rng.integers(1, 4))
    ds.Manufacturer = "AltGamma Medical"
    ds.ManufacturerModelName = "Scinti B"
    ds.InstitutionName = "Synthetic B"
    ds.BodyPartExamined = "NECK"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.PatientOrientationCodeSequence = Sequence()  # type 2: this vendor leaves them empty
    ds.PatientGantryRelationshipCodeSequence = Sequence()
    ds.CountsAccumulated = int(pixels.sum())
    rows, cols = pixels.shape
    byte_mode = int(pixels.max()) <= 255 and bool(rng.random() < 0.5)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8 if byte_mode else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.EnergyWindowVector = [1]
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = [1]
    ds.NumberOfDetectors = 1
    ds.ActualFrameDuration = int(rng.integers(120, 900)) * 1000
    win = Dataset()
    band = Dataset()
    band.EnergyWindowLowerLimit, band.EnergyWindowUpperLimit = "129.5", "150.5"
    win.EnergyWindowRangeSequence = Sequence([band])
    win.EnergyWindowName = "EM"
    ds.EnergyWindowInformationSequence = Sequence([win])
    ph = Dataset()
    ph.RadionuclideCodeSequence = Sequence([_code("44588005", "SCT", "Technetium^99m^")])
    ph.Radiopharmaceutical = "Pertechnetate"
    ds.RadiopharmaceuticalInformationSequence = Sequence([ph])
    det = Dataset()
    det.CollimatorType = "PARA" if meta["geometry"] == "parallel" else "PINH"
    det.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    det.ImagePositionPatient = [f"{-cols * spacing / 2:.2f}", "0", f"{rows * spacing / 2:.2f}"]
    ds.DetectorInformationSequence = Sequence([det])
    dtype = "u1" if byte_mode else "<u2"
    ds.PixelData = pixels.astype(dtype).tobytes()
    return ds


def make_case(
    seed: int, size: int = 256, *, patient_id: str | None = None, anatomy_seed: int | None = None
) -> PhantomCase:
    """One family-B study; same signature and truth contract as the family-A ``make_case``.

    Parameters
    ----------
    seed : int
        Seeds what varies per study (field of view, blur, noise, contrast).
    size : int
        Matrix size (rows = columns), a multiple of 4 and at least 32.
    patient_id : str, optional
        PatientID; default ``ALT-<anatomy_seed>``.
    anatomy_seed : int, optional
        Seeds the patient's anatomy; default ``seed``.

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
    anatomy = _patient(np.random.default_rng([anatomy_seed, 11]))
    rng = np.random.default_rng([seed, 12])
    expected, truth, meta = _render(rng, anatomy, size)
    total = float(np.exp(rng.uniform(np.log(1.5e4), np.log(1.2e6))))
    counts = np.clip(rng.poisson(expected * (total / max(expected.sum(), 1e-9))), 0, 65535)
    patient_id = patient_id or f"ALT-{anatomy_seed:08d}"
    ds = _dataset(counts, meta["pixel_spacing_mm"], seed, patient_id, rng, meta)
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


def write_cases(
    out: Path | str, n: int, seed: int, size: int | list[int] = 256, progress: Any = None
) -> list[Path]:
    """Write ``n`` family-B studies to ``OUT/<case>/image.dcm`` + ``truth.npz``.

    Same layout, patient grouping and arguments as :func:`dicom_node.demo.phantoms.write_cases`.
    """
    folders = write_planned_cases(make_case, out, n, seed, size, progress, prefix="B")
    LOGGER.info("wrote %d family-B phantom studies to %s", n, out)
    return folders
