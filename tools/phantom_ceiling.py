"""How much of a phantom's thyroid truth the image itself shows: a reference for the Dice targets.

The phantoms put the truth on the object (the gland before blur and noise). Where the gland's
edge is faint (a thin lobe, a slow rise of activity from the outline) and the blur is wide, the
outline is not in the image, and no reader of the image can place it. This tool measures that
per case: it renders the **noise-free** expected image of each test case and takes the
iso-contour at the threshold (2-90 % of the gland's peak, 45 steps) that best matches the truth,
keeping only what lies near the truth (distractors removed by the oracle too). The mean of that
per-case best Dice is what a perfect "outline at the right level" reader would score.

It is a reference, not a bound: it knows the answer per case (an upper hand no model has) but
draws only iso-contours (a network can also use shape). A model far below it has room to learn;
a target above it asks for an outline the image does not show.

    .venv/bin/python tools/phantom_ceiling.py --family B --seed 7100 --size 256 --n 100

Seeds and sizes follow ``write_cases`` (``plan_cases``), so ``--seed 7100 --size 256 --n 100``
is the same 100 studies as ``phantoms DIR --n 100 --seed 7100 --size 256 --family B``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from dicom_node.demo import phantoms, phantoms_alt, phantoms_c, phantoms_classic, phantoms_d
from dicom_node.demo.phantoms import plan_cases

Render = Callable[[int, int, int], tuple[np.ndarray, dict[str, np.ndarray], dict]]


def _family_a(seed: int, anatomy_seed: int, size: int) -> tuple:
    # the generators' own renderers, before their Poisson step (what make_case samples counts from)
    anatomy = phantoms._anatomy(np.random.default_rng([anatomy_seed, 1]))
    return phantoms._render(np.random.default_rng([seed, 2]), anatomy, size)


def _family_b(seed: int, anatomy_seed: int, size: int) -> tuple:
    anatomy = phantoms_alt._patient(np.random.default_rng([anatomy_seed, 11]))
    return phantoms_alt._render(np.random.default_rng([seed, 12]), anatomy, size)


def _classic(seed: int, anatomy_seed: int, size: int) -> tuple:
    anatomy = phantoms_classic._anatomy(np.random.default_rng([anatomy_seed, 1]))
    return phantoms_classic._render(np.random.default_rng([seed, 2]), anatomy, size)


def _family_c(seed: int, anatomy_seed: int, size: int) -> tuple:
    # phantoms_c.make_case up to its Poisson step
    anat = phantoms_c._anatomy(np.random.default_rng([anatomy_seed, 31]))
    rng = np.random.default_rng([seed, 32])
    st = phantoms_c._study(rng, anat, size)
    spectrum = phantoms_c._Spectrum(size, st["pixel"])
    thyroid, nodule, _, signal = phantoms_c._gland_slabs(anat, st, size, spectrum)
    phantoms_c._distractors(rng, anat, st, size, spectrum, signal)
    image = spectrum.image(st["scatter_fraction"], st["scatter_length"])
    expected = phantoms_c._detector(rng, st, size, image)
    fwhm = phantoms_c._fwhm(st, st["z_mid"])
    return expected, {"thyroid": thyroid, "nodule": nodule}, {"fwhm_mm": fwhm}


def _family_d(seed: int, anatomy_seed: int, size: int) -> tuple:
    # phantoms_d.make_case's own noise-free image (zoomed like the stored counts when coarse)
    _, study, _, image, thyroid, cold = phantoms_d.render_expected(seed, size, anatomy_seed)
    if study["coarse_zoom"]:
        image = phantoms_d._zoom2(image)
    return image, {"thyroid": thyroid, "nodule": cold}, {"fwhm_mm": phantoms_d._fwhm_of(study)}


RENDERERS: dict[str, Render] = {
    "A": _family_a,
    "B": _family_b,
    "C": _family_c,
    "D": _family_d,
    "classic": _classic,
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def best_isocontour_dice(image: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(best Dice, its threshold as a fraction of the gland's peak) of one noise-free image."""
    radius = max(2, image.shape[0] // 32)
    near = sitk.GetArrayFromImage(
        sitk.BinaryDilate(sitk.GetImageFromArray(truth.astype(np.uint8)), [radius, radius])
    ).astype(bool)
    peak = float(image[truth].max())
    scores = [(_dice((image >= f * peak) & near, truth), f) for f in np.linspace(0.02, 0.9, 45)]
    return max(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(RENDERERS), required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    render = RENDERERS[args.family]
    rows = []
    for item in plan_cases(args.n, args.seed):
        image, truth, meta = render(item["seed"], item["anatomy_seed"], args.size)
        if truth["thyroid"].any():
            dice, level = best_isocontour_dice(image, truth["thyroid"])
            rows.append((dice, level, float(meta.get("fwhm_mm", 0.0))))
    dice = np.array([r[0] for r in rows])
    fwhm = np.array([r[2] for r in rows])
    print(
        f"family {args.family}, {args.size}x{args.size}, seed {args.seed}: {len(rows)} cases, "
        f"best iso-contour thyroid Dice mean {dice.mean():.3f}, median {np.median(dice):.3f}, "
        f"10th percentile {np.percentile(dice, 10):.3f}, share >= 0.97: {(dice >= 0.97).mean():.2f}"
    )
    for lo, hi in ((0.0, 3.0), (3.0, 5.0), (5.0, 99.0)):
        pick = (fwhm >= lo) & (fwhm < hi)
        if pick.any():
            print(f"  FWHM {lo:g}-{hi:g} mm: {int(pick.sum())} cases, mean {dice[pick].mean():.3f}")


if __name__ == "__main__":
    main()
