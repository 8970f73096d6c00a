"""Pre- and post-processing declared by a manifest, in pure numpy.

Shared by the node (``runner.py``) and by training's evaluation, so that what a version is
measured on is exactly what it is served with.

* :class:`Preprocess`: a frame (H, W) of any numeric dtype -> float32 (C, h, w): resample to the
  manifest's ``input.size`` (bilinear) and normalise.
* :class:`Postprocess`: network output (K, h, w) -> activation -> probabilities resampled
  bilinearly back to (H, W) -> threshold -> ``{segment key: bool (H, W)}``.

Resampling uses pixel-centre alignment (a pixel covers ``[i, i+1)`` and its value sits at
``i + 0.5``), as PIL, ITK with matching physical extents, OpenCV ``INTER_LINEAR`` and
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` do, with edge
replication outside the image and no anti-aliasing filter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dicom_node.modelstore.manifest import InputSpec, Normalization, OutputSpec, Segment

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
    """Network output -> boolean masks per segment key, at the source frame's size.

    Sigmoid (multi-label; segments may overlap): ``mask = p[channel] > threshold``.
    Softmax (channel 0 = background; one label per pixel): ``mask = argmax(p) == channel``
    (``threshold`` is not used). ``none``: the output already holds probabilities, thresholded
    like sigmoid.
    Probabilities are resampled bilinearly to the frame's size before thresholding, which gives
    smoother boundaries than resampling the binary masks.

    Parameters
    ----------
    output_spec:
        The manifest's :class:`~dicom_node.modelstore.manifest.OutputSpec`.
    segments:
        The manifest's segments (key, channel).
    """

    def __init__(self, output_spec: OutputSpec, segments: Sequence[Segment]) -> None:
        self.spec = output_spec
        self.segments = list(segments)
        self.channels_needed = max(s.channel for s in self.segments) + 1

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
        arr = np.asarray(logits)
        if arr.ndim != 3:
            raise ValueError(f"logits must have shape (K, h, w), got {arr.shape}")
        if arr.shape[0] < self.channels_needed:
            raise ValueError(
                f"logits have {arr.shape[0]} channels, segments need {self.channels_needed} "
                f"(channels {sorted(s.channel for s in self.segments)})"
            )
        probs = activate(arr, self.spec.activation)
        target = tuple(shape) if shape is not None else arr.shape[1:]
        if self.spec.activation == "softmax":
            resized = resize_bilinear(probs, target) if target != arr.shape[1:] else probs
            labels = np.argmax(resized, axis=0)
            return {s.key: labels == s.channel for s in self.segments}
        masks: dict[str, np.ndarray] = {}
        for seg in self.segments:
            channel = probs[seg.channel]
            if target != channel.shape:
                channel = resize_bilinear(channel, target)
            masks[seg.key] = np.asarray(channel > self.spec.threshold, dtype=bool)
        return masks
