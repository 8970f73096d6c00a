"""Pre- and post-processing declared by a manifest, in pure numpy.

Shared by the node (``runner.py``) and by training's evaluation, so that what a version is
measured on is exactly what it is served with.

* :class:`Preprocess`: a frame (H, W) of any numeric dtype -> float32 (C, h, w): resample to the
  manifest's ``input.size`` (bilinear) and normalise.
* :class:`Postprocess`: network output (K, h, w) -> activation -> probabilities resampled
  bilinearly back to (H, W) -> threshold -> ``{segment key: bool (H, W)}``; with test-time
  augmentation (manifest ``tta:``) the activated outputs of the plain and the flipped inputs
  (flipped back, :func:`tta_inputs` / :func:`undo_tta`) are averaged before resampling.
* :func:`apply_steps`: the manifest's ``postprocess:`` steps on those masks, in order, per frame
  (``connectivity: 2d``) or per volume (``3d``); see :mod:`dicom_node.modelstore.morphology`.

Resampling uses pixel-centre alignment (a pixel covers ``[i, i+1)`` and its value sits at
``i + 0.5``), as PIL, ITK with matching physical extents, OpenCV ``INTER_LINEAR`` and
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` do, with edge
replication outside the image and no anti-aliasing filter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from dicom_node.modelstore import morphology
from dicom_node.modelstore.manifest import (
    FillHoles,
    InputSpec,
    KeepInRegion,
    LargestComponent,
    MinSize,
    Normalization,
    OutputSpec,
    PostprocessStep,
    Segment,
    Within,
)

LOGGER = logging.getLogger(__name__)

_EPS = 1e-12


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (lower index, upper index, upper weight) for resampling one axis."""
    scale = n_in / n_out
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    centres = np.clip(centres, 0.0, n_in - 1)
    lower = np.floor(centres).astype(np.intp)
    upper = np.minimum(lower + 1, n_in - 1)
    weight = centres - lower
    return lower, upper, weight


def resize_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resample the last two axes of ``image`` to ``size`` (rows, cols), bilinear.

    Parameters
    ----------
    image:
        Array (..., H, W) of any real dtype.
    size:
        Output (rows, cols), each >= 1.

    Returns
    -------
    numpy.ndarray
        float32 array (..., rows, cols). Resampling to the same size returns the values
        unchanged (as float32); a constant image stays constant.

    Raises
    ------
    ValueError
        ``image`` has fewer than two axes or an empty spatial axis, or ``size`` is not positive.
    """
    arr = np.asarray(image)
    if arr.ndim < 2 or arr.shape[-1] == 0 or arr.shape[-2] == 0:
        raise ValueError(f"image must have shape (..., H, W) with H, W >= 1, got {arr.shape}")
    rows, cols = int(size[0]), int(size[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"size must be two positive integers, got {tuple(size)}")
    data = arr.astype(np.float64, copy=False)
    h, w = data.shape[-2:]
    if (h, w) != (rows, cols):
        if h != rows:
            lo, hi, wt = _axis_weights(h, rows)
            wt = wt[:, None]
            data = data[..., lo, :] * (1.0 - wt) + data[..., hi, :] * wt
        if w != cols:
            lo, hi, wt = _axis_weights(w, cols)
            data = data[..., lo] * (1.0 - wt) + data[..., hi] * wt
    return data.astype(np.float32)


def resize_nearest(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resample the last two axes of ``image`` to ``size`` by nearest neighbour (dtype kept)."""
    arr = np.asarray(image)
    if arr.ndim < 2:
        raise ValueError(f"image must have shape (..., H, W), got {arr.shape}")
    h, w = arr.shape[-2:]
    rows, cols = int(size[0]), int(size[1])
    ri = np.minimum(((np.arange(rows) + 0.5) * h / rows).astype(np.intp), h - 1)
    ci = np.minimum(((np.arange(cols) + 0.5) * w / cols).astype(np.intp), w - 1)
    return arr[..., ri[:, None], ci[None, :]]


def normalize(image: np.ndarray, spec: Normalization) -> np.ndarray:
    """Scale intensities as ``spec`` says; returns float32 of the same shape.

    ``percentile``: clip to the ``lower``/``upper`` percentiles (default 0/100) and scale to
    [0, 1]; ``minmax``: min..max -> [0, 1]; ``zscore``: ``(x - mean) / std``; ``fixed``:
    ``x * scale + offset``; ``none``: unchanged. Constant images map to 0 (no division by zero).
    """
    x = np.asarray(image, dtype=np.float64)
    method = spec.method
    if method == "none":
        out = x
    elif method == "fixed":
        out = x * float(spec.scale if spec.scale is not None else 1.0) + float(spec.offset or 0.0)
    elif method == "zscore":
        std = float(x.std())
        out = (x - float(x.mean())) / (std if std > _EPS else 1.0)
    elif method in ("minmax", "percentile"):
        if method == "minmax":
            lo, hi = float(x.min()), float(x.max())
        else:
            lower = 0.0 if spec.lower is None else spec.lower
            upper = 100.0 if spec.upper is None else spec.upper
            lo, hi = (float(v) for v in np.percentile(x, [lower, upper]))
        if hi - lo <= _EPS:
            out = np.zeros_like(x)
        else:
            out = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    else:  # pragma: no cover - the manifest schema closes the vocabulary
        raise ValueError(f"normalization method {method!r} is not supported")
    return out.astype(np.float32)


class Preprocess:
    """Frame -> network input, as declared by a manifest's ``input``.

    Parameters
    ----------
    input_spec:
        The manifest's :class:`~dicom_node.modelstore.manifest.InputSpec`.

    Examples
    --------
    >>> pre = Preprocess(manifest.input)          # doctest: +SKIP
    >>> x = pre(frame)                            # (C, h, w) float32  # doctest: +SKIP
    """

    def __init__(self, input_spec: InputSpec) -> None:
        self.spec = input_spec
        self.size = tuple(input_spec.size)
        self.channels = input_spec.channels

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Return the float32 (C, h, w) input for one frame.

        Parameters
        ----------
        frame:
            (H, W) grey frame of any real dtype, or (H, W, S) with S samples (e.g. RGB). A grey
            frame is repeated over ``channels``; an S-sample frame is used as is when
            S == channels and averaged to grey otherwise.

        Raises
        ------
        ValueError
            ``frame`` is not 2-D or 3-D, is empty, or is not numeric.
        """
        arr = np.asarray(frame)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"frame must be numeric, got dtype {arr.dtype}")
        if arr.ndim == 2:
            planes = arr[None]
        elif arr.ndim == 3:
            planes = np.moveaxis(arr, -1, 0)
            if planes.shape[0] != self.channels:
                planes = planes.astype(np.float64).mean(axis=0, keepdims=True)
        else:
            raise ValueError(f"frame must have shape (H, W) or (H, W, S), got {arr.shape}")
        resized = resize_bilinear(planes, self.size)
        out = normalize(resized, self.spec.normalization)
        if out.shape[0] != self.channels:
            out = np.repeat(out[:1], self.channels, axis=0)
        return np.ascontiguousarray(out, dtype=np.float32)


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """Apply ``sigmoid`` / ``softmax`` (over axis 0) / ``none`` to (K, h, w) network output."""
    x = np.asarray(logits, dtype=np.float64)
    if activation == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic
    if activation == "softmax":
        shifted = np.exp(x - x.max(axis=0, keepdims=True))
        return shifted / shifted.sum(axis=0, keepdims=True)
    if activation == "none":
        return x
    raise ValueError(f"activation must be sigmoid, softmax or none, got {activation!r}")


class Postprocess:
    """Network output -> probabilities and boolean masks per segment key, at the frame's size.

    Sigmoid (multi-label; segments may overlap): ``mask = p[channel] > threshold`` (the
    segment's own ``threshold`` when it has one, else ``output.threshold``).
    Softmax (channel 0 = background; one label per pixel): ``mask = argmax(p) == channel``
    (``threshold`` is not used). ``none``: the output already holds probabilities, thresholded
    like sigmoid.
    Probabilities are resampled bilinearly to the frame's size before thresholding, which gives
    smoother boundaries than resampling the binary masks. With several outputs of one frame
    (test-time augmentation, already flipped back) their activated probabilities are averaged
    first.

    Parameters
    ----------
    output_spec:
        The manifest's :class:`~dicom_node.modelstore.manifest.OutputSpec`.
    segments:
        The manifest's segments (key, channel, optional threshold).
    """

    def __init__(self, output_spec: OutputSpec, segments: Sequence[Segment]) -> None:
        self.spec = output_spec
        self.segments = list(segments)
        self.channels_needed = max(s.channel for s in self.segments) + 1
        self.thresholds = {
            s.key: output_spec.threshold if s.threshold is None else s.threshold
            for s in self.segments
        }

    def __call__(
        self, logits: np.ndarray, shape: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Return ``{key: bool (H, W)}`` for one frame's output.

        Parameters
        ----------
        logits:
            (K, h, w) network output for one frame.
        shape:
            (H, W) of the source frame; ``None`` keeps (h, w).

        Raises
        ------
        ValueError
            ``logits`` is not 3-D or has fewer channels than the segments need.
        """
        return self.decode([logits], shape)[0]

    def decode(
        self, outputs: Sequence[np.ndarray], shape: Sequence[int] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Return ``(masks, probabilities)`` of one frame from one or several outputs.

        Parameters
        ----------
        outputs:
            (K, h, w) network outputs of one frame: the plain run, then any test-time
            augmentations already flipped back (:func:`undo_tta`). Their activated values are
            averaged.
        shape:
            (H, W) of the source frame; ``None`` keeps (h, w).

        Returns
        -------
        (dict, dict)
            ``{key: bool (H, W)}`` and ``{key: float32 (H, W) in [0, 1]}``: the masks, and the
            (averaged) probability of each segment resampled to the frame.

        Raises
        ------
        ValueError
            No output, an output that is not 3-D, outputs of different shapes, or fewer
            channels than the segments need.
        """
        arrays = [np.asarray(o) for o in outputs]
        if not arrays:
            raise ValueError("decode needs at least one output")
        first = arrays[0]
        if first.ndim != 3:
            raise ValueError(f"logits must have shape (K, h, w), got {first.shape}")
        if any(a.shape != first.shape for a in arrays):
            raise ValueError(f"outputs differ in shape: {sorted({a.shape for a in arrays})}")
        if first.shape[0] < self.channels_needed:
            raise ValueError(
                f"logits have {first.shape[0]} channels, segments need {self.channels_needed} "
                f"(channels {sorted(s.channel for s in self.segments)})"
            )
        target = tuple(shape) if shape is not None else first.shape[1:]
        if self.spec.activation == "softmax":
            probs = np.mean([activate(a, "softmax") for a in arrays], axis=0)
            resized = resize_bilinear(probs, target) if target != first.shape[1:] else probs
            labels = np.argmax(resized, axis=0)
            masks = {s.key: labels == s.channel for s in self.segments}
            return masks, {
                s.key: np.asarray(resized[s.channel], dtype=np.float32) for s in self.segments
            }
        masks, probabilities = {}, {}
        for seg in self.segments:
            channel = np.mean([activate(a[seg.channel], self.spec.activation) for a in arrays], 0)
            if target != channel.shape:
                channel = resize_bilinear(channel, target)
            masks[seg.key] = np.asarray(channel > self.thresholds[seg.key], dtype=bool)
            probabilities[seg.key] = np.clip(channel, 0.0, 1.0).astype(np.float32)
        return masks, probabilities


# ------------------------------------------------------------------ test-time augmentation
TTA_AXES = {"flip_lr": -1, "flip_ud": -2}
"""Axis each test-time augmentation flips (of (..., h, w) arrays): columns or rows."""


def tta_inputs(batch: np.ndarray, tta: Sequence[str]) -> list[np.ndarray]:
    """The network inputs of a batch (N, C, h, w): the plain one, then one per augmentation.

    Raises
    ------
    ValueError
        An augmentation that is not in :data:`TTA_AXES`.
    """
    out = [batch]
    for name in tta:
        if name not in TTA_AXES:
            raise ValueError(f"test-time augmentation {name!r} unknown; known: {sorted(TTA_AXES)}")
        out.append(np.ascontiguousarray(np.flip(batch, axis=TTA_AXES[name])))
    return out


def undo_tta(output: np.ndarray, name: str | None) -> np.ndarray:
    """Flip a network output (N, K, h, w) of augmentation ``name`` back (``None``: plain run)."""
    if name is None:
        return output
    return np.flip(output, axis=TTA_AXES[name])


# ------------------------------------------------------------------ post-processing steps
def default_volumes(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Frame indices of each volume when the caller names none: consecutive frames of one size.

    A series (or case) whose frames all share one size is one volume.
    """
    volumes: list[list[int]] = []
    for index, shape in enumerate(shapes):
        if volumes and shapes[volumes[-1][-1]] == shape:
            volumes[-1].append(index)
        else:
            volumes.append([index])
    return volumes


def slice_spacing(positions: Sequence[float] | None) -> float | None:
    """Distance between frames (mm) from their positions along the slice normal: the median
    step, or ``None`` with fewer than two frames (``min_size`` in ``mm3`` then uses ``pixels``)."""
    if positions is None or len(positions) < 2:
        return None
    steps = np.abs(np.diff(np.asarray(positions, dtype=np.float64)))
    steps = steps[steps > 1e-6]
    return float(np.median(steps)) if steps.size else None


def _keep(labels: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Mask of the components whose entry in the boolean table ``kept`` (by label) is true."""
    table = np.asarray(kept, dtype=bool).copy()
    table[0] = False
    return table[labels]


def _largest(mask: np.ndarray, keep: int) -> np.ndarray:
    labels, count = morphology.label(mask)
    if count <= keep:
        return mask
    sizes = morphology.sizes(labels, count)
    order = np.argsort(-sizes[1:], kind="stable")[:keep] + 1  # ties: first in raster order
    kept = np.zeros(count + 1, dtype=bool)
    kept[order] = True
    return _keep(labels, kept)


def _min_pixels(
    step: MinSize, spacing: Sequence[float] | None, slice_spacing: float | None
) -> float:
    """Smallest component size a :class:`MinSize` step keeps, in pixels (voxels in 3-D)."""
    if step.mm2 is not None and spacing is not None:
        return step.mm2 / (float(spacing[0]) * float(spacing[1]))
    if step.mm3 is not None and spacing is not None and slice_spacing is not None:
        return step.mm3 / (float(spacing[0]) * float(spacing[1]) * float(slice_spacing))
    if step.pixels is not None:
        return float(step.pixels)
    unit = (
        "mm2 (needs the pixel spacing)"
        if step.mm2 is not None
        else ("mm3 (needs the pixel and slice spacing)")
    )
    raise ValueError(
        f"postprocess min_size of {step.segment!r} is given in {unit}, which this series does "
        "not say; add 'pixels' to the step as the size to use then"
    )


def _min_size(mask: np.ndarray, smallest: float) -> np.ndarray:
    labels, count = morphology.label(mask)
    if count == 0:
        return mask
    return _keep(labels, morphology.sizes(labels, count) >= smallest)


def _fill_holes(mask: np.ndarray, where: np.ndarray | None) -> np.ndarray:
    if where is None:
        return morphology.fill_holes(mask)
    filled = morphology.fill_holes(mask, where=where)
    labels, count = morphology.label(where)
    if count == 0:
        return filled
    touching = np.zeros(count + 1, dtype=bool)
    touching[labels[morphology.dilate(filled) & where]] = True
    return filled | _keep(labels, touching)


def _within(mask: np.ndarray, of: np.ndarray, min_inside: float | None) -> np.ndarray:
    labels, count = morphology.label(mask)
    if count == 0:
        return mask
    if min_inside is None:
        kept = np.zeros(count + 1, dtype=bool)
        kept[labels[morphology.dilate(of) & mask]] = True
    else:
        inside = np.bincount(labels[of & mask], minlength=count + 1)
        kept = inside >= min_inside * morphology.sizes(labels, count)
    return _keep(labels, kept)


def _keep_in_region(mask: np.ndarray, step: KeepInRegion) -> np.ndarray:
    labels, count = morphology.label(mask)
    if count == 0:
        return mask
    rows, cols = mask.shape[-2:]
    where = np.nonzero(labels)  # foreground pixels only: a CT volume stays cheap
    owner = labels[where]
    sizes = np.maximum(morphology.sizes(labels, count), 1)
    centre_r = (np.bincount(owner, where[-2] + 0.5, count + 1) / sizes) / rows
    centre_c = (np.bincount(owner, where[-1] + 0.5, count + 1) / sizes) / cols
    kept = (
        (centre_r >= step.rows[0])
        & (centre_r <= step.rows[1])
        & (centre_c >= step.cols[0])
        & (centre_c <= step.cols[1])
    )
    if not step.border:
        edges = (labels[..., 0, :], labels[..., -1, :], labels[..., :, 0], labels[..., :, -1])
        kept[np.unique(np.concatenate([e.ravel() for e in edges]))] = False
    return _keep(labels, kept)


def apply_step(
    step: PostprocessStep,
    masks: Mapping[str, np.ndarray],
    spacing: Sequence[float] | None = None,
    slice_spacing: float | None = None,
) -> np.ndarray:
    """The new mask of ``step.segment`` after one step, on one frame (2-D) or volume (3-D).

    Parameters
    ----------
    step:
        A manifest ``postprocess:`` entry.
    masks:
        ``{key: bool array}`` of every segment, all of one shape (2-D or 3-D).
    spacing:
        Pixel spacing (row, column) in mm, for ``min_size`` in ``mm2`` / ``mm3``.
    slice_spacing:
        Distance between frames in mm, for ``min_size`` in ``mm3``.

    Raises
    ------
    ValueError
        ``min_size`` in physical units without the spacing it needs and no ``pixels``.
    """
    mask = np.asarray(masks[step.segment], dtype=bool)
    if isinstance(step, LargestComponent):
        return _largest(mask, step.keep)
    if isinstance(step, MinSize):
        return _min_size(mask, _min_pixels(step, spacing, slice_spacing))
    if isinstance(step, FillHoles):
        where = None if step.where is None else np.asarray(masks[step.where], dtype=bool)
        return _fill_holes(mask, where)
    if isinstance(step, Within):
        return _within(mask, np.asarray(masks[step.of], dtype=bool), step.min_inside)
    if isinstance(step, KeepInRegion):
        return _keep_in_region(mask, step)
    raise ValueError(f"postprocess op {step.op!r} is not supported")  # pragma: no cover


def apply_steps(
    masks: Sequence[Mapping[str, np.ndarray]],
    steps: Sequence[PostprocessStep],
    *,
    spacing: Sequence[float] | None = None,
    slice_spacing: float | None = None,
    volumes: Sequence[Sequence[int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Apply a manifest's ``postprocess:`` steps, in order, to the masks of a series.

    Parameters
    ----------
    masks:
        Per frame, ``{key: bool (H, W)}`` (thresholded); not changed.
    steps:
        The manifest's ``postprocess`` list.
    spacing:
        Pixel spacing (row, column) in mm; ``None``: unknown (``min_size`` then uses
        ``pixels``).
    slice_spacing:
        Distance between the frames of a volume in mm (``min_size`` in ``mm3``); ``None``:
        unknown.
    volumes:
        Frame indices of each volume, for ``connectivity: 3d`` steps (the worker passes its
        source groups); default :func:`default_volumes`. ``2d`` steps treat every frame alone.

    Returns
    -------
    list[dict[str, numpy.ndarray]]
        New per-frame masks (the input is returned as is when there are no steps).

    Raises
    ------
    ValueError
        The frames of one volume differ in size, or a ``min_size`` cannot be converted.
    """
    if not steps:
        return [dict(m) for m in masks]
    frames = [{k: np.asarray(v, dtype=bool) for k, v in m.items()} for m in masks]
    if volumes is None:
        volumes = default_volumes([next(iter(f.values())).shape for f in frames if f] or [])
    for step in steps:
        if step.connectivity == "2d":
            for frame in frames:
                frame[step.segment] = apply_step(step, frame, spacing)
            continue
        for members in volumes:
            chosen = [frames[i] for i in members]
            shapes = {f[step.segment].shape for f in chosen}
            if len(shapes) > 1:
                raise ValueError(
                    f"postprocess {step.op} of {step.segment!r} (connectivity 3d): the frames of "
                    f"one volume differ in size {sorted(shapes)}"
                )
            volume = {key: np.stack([f[key] for f in chosen]) for key in chosen[0]}
            result = apply_step(step, volume, spacing, slice_spacing)
            for n, frame in enumerate(chosen):
                frame[step.segment] = result[n]
    return frames
