"""Sample transforms: small callable classes, each owning its randomness.

A sample is a dict ``{"image": (H, W) counts, "masks": bool (K, H, W), "case": str}``.
Augmentations work on raw counts at the acquired matrix size; :class:`ToNetworkInput` comes last
and applies the node's own :class:`~dicom_node.modelstore.processing.Preprocess` (resample to the
manifest's input size, then normalise), so the network is trained on exactly what the node feeds
it.

Which augmentations are allowed is a question of anatomy and of modality, so none is on unless
the config asks for it. An anterior neck view is roughly left-right symmetric (the lobes differ,
but either can be the larger), so the thyroid recipe asks for left-right flips; a one-sided organ
(liver, spleen) must not. Up-down flips are not offered (the salivary glands are always above the
thyroid). Count thinning suits count images (NM) only; :data:`AUGMENT_MODALITIES` says which
augmentation suits which modality and :func:`build_augmentation` refuses the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dicom_node.modelstore.manifest import InputSpec
from dicom_node.modelstore.processing import Preprocess, resize_bilinear

LOGGER = logging.getLogger(__name__)

Sample = dict[str, Any]


class Randomizable:
    """Mixin: the transform owns a ``numpy.random.Generator`` in ``self.R``."""

    R: np.random.Generator = np.random.default_rng(0)

    def set_random_state(self, seed: int | None = None) -> Randomizable:
        """Re-seed this transform; returns ``self`` so it chains."""
        self.R = np.random.default_rng(seed)
        return self


def _check_prob(prob: float) -> float:
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be between 0 and 1, got {prob!r}")
    return float(prob)


class RandCountScale(Randomizable):
    """Simulate a shorter acquisition: keep each count with probability ``f`` (binomial thinning).

    Thinning a Poisson image gives a Poisson image of ``f`` times the mean, so noise stays
    physically right (multiplying the pixel values would not).

    Parameters
    ----------
    prob : float
        Probability of applying.
    low, high : float
        Range of the kept fraction ``f``, ``0 < low <= high <= 1``.
    """

    def __init__(self, prob: float = 0.5, low: float = 0.3, high: float = 1.0) -> None:
        self.prob = _check_prob(prob)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"low/high must satisfy 0 < low <= high <= 1, got {low!r}, {high!r}")
        self.low, self.high = float(low), float(high)

    modalities: tuple[str, ...] = ("NM",)
    """Modalities whose pixels are counts (a CT in HU or an MR is not: thinning is meaningless)."""

    def __call__(self, sample: Sample) -> Sample:
        if self.R.random() >= self.prob:
            return sample
        image = np.asarray(sample["image"])
        low = float(image.min()) if image.size else 0.0
        if low < 0:
            # never clip silently: negative values mean the data is not counts (CT in HU)
            raise ValueError(
                f"the counts augmentation needs count data (>= 0), got a minimum of {low:g}; "
                f"it suits {list(self.modalities)} only: remove augment.counts for this data"
            )
        counts = np.rint(image).astype(np.int64)
        fraction = self.R.uniform(self.low, self.high)
        return {**sample, "image": self.R.binomial(counts, fraction).astype(np.float32)}


class RandFlipLR(Randomizable):
    """Flip image and masks left-right with probability ``prob`` (never up-down: see module doc)."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = _check_prob(prob)

    def __call__(self, sample: Sample) -> Sample:
        if self.R.random() >= self.prob:
            return sample
        return {
            **sample,
            "image": np.ascontiguousarray(sample["image"][..., ::-1]),
            "masks": np.ascontiguousarray(sample["masks"][..., ::-1]),
        }


def warp_affine(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Bilinear resampling of the last two axes: ``out[p] = image[matrix @ p + offset]``.

    Coordinates are (row, col) pixel centres; outside the image the value is 0.
    """
    arr = np.asarray(image, dtype=np.float32)
    h, w = arr.shape[-2:]
    rr, cc = np.meshgrid(
        np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"
    )
    src_r = matrix[0, 0] * rr + matrix[0, 1] * cc + offset[0]
    src_c = matrix[1, 0] * rr + matrix[1, 1] * cc + offset[1]
    r0 = np.floor(src_r).astype(np.intp)
    c0 = np.floor(src_c).astype(np.intp)
    fr = (src_r - r0).astype(np.float32)
    fc = (src_c - c0).astype(np.float32)
    out = np.zeros(arr.shape, dtype=np.float32)
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            ri, ci = r0 + dr, c0 + dc
            inside = (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
            vals = arr[..., np.clip(ri, 0, h - 1), np.clip(ci, 0, w - 1)]
            out += vals * (wr * wc * inside)
    return out


class RandAffine(Randomizable):
    """Small rotation, isotropic scaling and translation about the image centre.

    Parameters
    ----------
    prob : float
        Probability of applying.
    rotate_deg : float
        Rotation drawn from ``[-rotate_deg, rotate_deg]``.
    scale : (float, float)
        Zoom factor range (> 1 enlarges the anatomy).
    translate : float
        Shift drawn from ``[-translate, translate]`` times the image size, per axis.
    """

    def __init__(
        self,
        prob: float = 0.7,
        rotate_deg: float = 12.0,
        scale: Sequence[float] = (0.85, 1.15),
        translate: float = 0.08,
    ) -> None:
        self.prob = _check_prob(prob)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
        self.rotate_deg, self.scale, self.translate = float(rotate_deg), tuple(scale), translate

    def __call__(self, sample: Sample) -> Sample:
        if self.R.random() >= self.prob:
            return sample
        image = np.asarray(sample["image"], dtype=np.float32)
        h, w = image.shape[-2:]
        angle = np.deg2rad(self.R.uniform(-self.rotate_deg, self.rotate_deg))
        zoom = self.R.uniform(self.scale[0], self.scale[1])
        shift = self.R.uniform(-self.translate, self.translate, size=2) * np.array([h, w])
        ca, sa = np.cos(angle), np.sin(angle)
        inverse = np.array([[ca, -sa], [sa, ca]]) / zoom
        centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        offset = centre - inverse @ (centre + shift)
        warped = warp_affine(image, inverse, offset)
        masks = warp_affine(sample["masks"].astype(np.float32), inverse, offset) >= 0.5
        return {**sample, "image": warped, "masks": masks}


class RandBlur(Randomizable):
    """Extra system blur: separable Gaussian with sigma drawn from ``[0, sigma_px]`` pixels."""

    def __init__(self, prob: float = 0.3, sigma_px: float = 1.2) -> None:
        self.prob = _check_prob(prob)
        if sigma_px <= 0:
            raise ValueError(f"sigma_px must be positive, got {sigma_px!r}")
        self.sigma_px = float(sigma_px)

    def __call__(self, sample: Sample) -> Sample:
        if self.R.random() >= self.prob:
            return sample
        sigma = self.R.uniform(0.3, self.sigma_px)
        radius = int(np.ceil(3 * sigma))
        x = np.arange(-radius, radius + 1, dtype=np.float32)
        kernel = np.exp(-0.5 * (x / sigma) ** 2)
        kernel /= kernel.sum()
        image = np.asarray(sample["image"], dtype=np.float32)
        padded = np.pad(image, radius, mode="edge")
        rows = sum(k * padded[i : i + image.shape[0], :] for i, k in enumerate(kernel))
        out = sum(k * rows[:, i : i + image.shape[1]] for i, k in enumerate(kernel))
        return {**sample, "image": np.asarray(out, dtype=np.float32)}


class ToNetworkInput:
    """The node's preprocessing for the image; masks resampled to the same grid.

    Masks are resampled bilinearly and thresholded at 0.5, which mirrors what
    :class:`~dicom_node.modelstore.processing.Postprocess` does on the way back.
    """

    def __init__(self, input_spec: InputSpec) -> None:
        self.preprocess = Preprocess(input_spec)
        self.size = tuple(input_spec.size)

    def __call__(self, sample: Sample) -> Sample:
        image = self.preprocess(np.asarray(sample["image"]))
        masks = np.asarray(sample["masks"])
        if masks.shape[-2:] != self.size:
            masks = resize_bilinear(masks.astype(np.float32), self.size) >= 0.5
        return {**sample, "image": image, "masks": masks.astype(np.float32)}


class RandCrop(Randomizable):
    """Crop a ``size`` x ``size`` patch of the network input (training speed-up).

    The network is fully convolutional, so it trains on patches and infers on the whole input.
    With probability ``foreground_prob`` the patch is centred (with jitter) on the first mask's
    foreground, so most patches hold the gland; otherwise it is placed uniformly.
    """

    def __init__(self, size: int, foreground_prob: float = 0.8) -> None:
        if size < 8:
            raise ValueError(f"crop size must be at least 8, got {size!r}")
        self.size = int(size)
        self.foreground_prob = _check_prob(foreground_prob)

    def __call__(self, sample: Sample) -> Sample:
        image, masks = sample["image"], sample["masks"]
        h, w = image.shape[-2:]
        if self.size >= h and self.size >= w:
            return sample
        ch, cw = min(self.size, h), min(self.size, w)
        fg = np.argwhere(masks[0] > 0.5) if masks.shape[0] else np.empty((0, 2))
        if len(fg) and self.R.random() < self.foreground_prob:
            centre = fg[self.R.integers(len(fg))] + self.R.normal(0, self.size / 8, size=2)
        else:
            centre = self.R.uniform([0, 0], [h, w])
        top = int(np.clip(round(centre[0] - ch / 2), 0, h - ch))
        left = int(np.clip(round(centre[1] - cw / 2), 0, w - cw))
        return {
            **sample,
            "image": np.ascontiguousarray(image[..., top : top + ch, left : left + cw]),
            "masks": np.ascontiguousarray(masks[..., top : top + ch, left : left + cw]),
        }


class Compose:
    """Apply transforms in order; failures name the transform and the case."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def set_random_state(self, seed: int) -> Compose:
        """Seed every randomizable member from one seed; returns ``self``."""
        seeds = np.random.SeedSequence(seed).spawn(len(self.transforms))
        for transform, child in zip(self.transforms, seeds, strict=True):
            if isinstance(transform, Randomizable):
                transform.set_random_state(int(child.generate_state(1)[0]))
        return self

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            try:
                sample = transform(sample)
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                raise RuntimeError(
                    f"applying transform {type(transform).__name__} to case "
                    f"{sample.get('case', '?')}"
                ) from exc
        return sample


AUGMENT_MODALITIES: dict[str, tuple[str, ...] | None] = {
    "counts": RandCountScale.modalities,
    "blur": None,
    "flip_lr": None,
    "affine": None,
}
"""Per augmentation, the modalities it makes sense for (None: any)."""


def build_augmentation(
    config: dict[str, Any], modalities: list[str] | tuple[str, ...] = ()
) -> list[Callable[[Sample], Sample]]:
    """Augmentations from the config's ``augment`` mapping (see ``configs/thyroid.yaml``).

    Keys: ``counts: {prob, low, high}``, ``flip_lr: prob``, ``affine: {prob, rotate_deg, scale,
    translate}``, ``blur: {prob, sigma_px}``. Nothing is on unless the config asks for it: in
    particular ``flip_lr`` is off unless set (a left-right flip is anatomically wrong for a
    one-sided organ such as the liver).

    Parameters
    ----------
    config : dict
        The ``augment`` section.
    modalities : list of str
        The model's ``input.modalities``. An augmentation that does not suit one of them is
        refused (:data:`AUGMENT_MODALITIES`); with ``[]`` (any modality) it is allowed with a
        warning, and ``counts`` still refuses negative pixel values when it runs.

    Raises
    ------
    ValueError
        An unknown key (with "did you mean"), or an augmentation that does not suit a declared
        modality.
    """
    from training.schema import AUGMENT_KEYS, check_keys

    check_keys(config, AUGMENT_MODALITIES, "augment")
    for name, value in config.items():
        if name in AUGMENT_KEYS and value:
            check_keys(value, AUGMENT_KEYS[name], f"augment.{name}")
        suits = AUGMENT_MODALITIES[name]
        if not value or suits is None:
            continue
        wrong = sorted(m for m in modalities if m not in suits)
        if wrong:
            raise ValueError(
                f"augment.{name} suits modalities {list(suits)} only, the model takes {wrong}; "
                f"remove augment.{name}"
            )
        if not modalities:
            LOGGER.warning(
                "augment.%s suits modalities %s only and model.input.modalities is [] (any)",
                name,
                list(suits),
            )
    out: list[Callable[[Sample], Sample]] = []
    if config.get("counts"):
        out.append(RandCountScale(**config["counts"]))
    if config.get("blur"):
        out.append(RandBlur(**config["blur"]))
    if config.get("flip_lr"):
        out.append(RandFlipLR(float(config["flip_lr"])))
    if config.get("affine"):
        out.append(RandAffine(**config["affine"]))
    return out
