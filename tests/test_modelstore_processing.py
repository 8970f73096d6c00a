"""Pre/post-processing: resampling geometry, normalisation, activation and thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.modelstore.manifest import InputSpec, Normalization, parse_manifest
from dicom_node.modelstore.processing import (
    Postprocess,
    Preprocess,
    normalize,
    resize_bilinear,
    resize_nearest,
)
from tests.helpers.onnx_models import manifest_dict


class TestResizeBilinear:
    def test_same_size_is_identity(self) -> None:
        img = np.arange(35, dtype=np.uint16).reshape(5, 7)
        out = resize_bilinear(img, (5, 7))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, img.astype(np.float32))

    def test_constant_stays_constant(self) -> None:
        out = resize_bilinear(np.full((13, 9), 42.0), (256, 100))
        np.testing.assert_allclose(out, 42.0)

    def test_upsample_by_two_matches_pixel_centre_alignment(self) -> None:
        img = np.array([[0.0, 4.0]])
        out = resize_bilinear(img, (1, 4))
        # centres of the output pixels at 0.25, 0.75, 1.25, 1.75 in input pixel units: with
        # half-pixel alignment and edge clamping that is 0, 1, 3, 4
        np.testing.assert_allclose(out, [[0.0, 1.0, 3.0, 4.0]])

    def test_linear_ramp_stays_linear_inside(self) -> None:
        ramp = np.tile(np.arange(16, dtype=np.float64), (4, 1))
        out = resize_bilinear(ramp, (4, 32))
        inner = out[0, 1:-1]
        np.testing.assert_allclose(np.diff(inner), 0.5, atol=1e-5)

    def test_downsample_by_two_averages_pairs(self) -> None:
        img = np.arange(16, dtype=np.float64).reshape(4, 4)
        out = resize_bilinear(img, (2, 2))
        expected = img.reshape(2, 2, 2, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(out, expected)

    def test_round_trip_smooth_image(self) -> None:
        yy, xx = np.mgrid[0:64, 0:64] / 64.0
        img = np.sin(3 * xx) + np.cos(2 * yy)
        back = resize_bilinear(resize_bilinear(img, (256, 256)), (64, 64))
        assert np.abs(back - img)[2:-2, 2:-2].max() < 0.01

    def test_batch_axes_are_kept(self) -> None:
        stack = np.random.default_rng(0).random((3, 2, 10, 12))
        out = resize_bilinear(stack, (5, 6))
        assert out.shape == (3, 2, 5, 6)
        np.testing.assert_allclose(out[1, 0], resize_bilinear(stack[1, 0], (5, 6)))

    def test_matches_torch_align_corners_false(self) -> None:
        torch = pytest.importorskip("torch")
        img = np.random.default_rng(1).random((1, 1, 37, 53)).astype(np.float32)
        for size in ((64, 64), (256, 256), (20, 31)):
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(img), size=size, mode="bilinear", align_corners=False
            ).numpy()
            np.testing.assert_allclose(resize_bilinear(img, size), ref, atol=1e-5)

    def test_bad_input_is_named(self) -> None:
        with pytest.raises(ValueError, match=r"image must have shape \(\.\.\., H, W\)"):
            resize_bilinear(np.zeros(5), (2, 2))
        with pytest.raises(ValueError, match=r"size must be two positive integers, got \(0, 2\)"):
            resize_bilinear(np.zeros((5, 5)), (0, 2))


class TestResizeNearest:
    def test_mask_round_trip_by_integer_factor(self) -> None:
        mask = np.random.default_rng(2).random((16, 16)) > 0.5
        up = resize_nearest(mask, (64, 64))
        assert up.dtype == bool
        np.testing.assert_array_equal(resize_nearest(up, (16, 16)), mask)


class TestNormalize:
    def test_minmax(self) -> None:
        out = normalize(
            np.array([[10, 20], [30, 50]], dtype=np.uint16), Normalization(method="minmax")
        )
        np.testing.assert_allclose(out, [[0, 0.25], [0.5, 1.0]])

    def test_percentile_clips(self) -> None:
        img = np.arange(1000, dtype=np.float64)
        img[-1] = 1e6  # a hot pixel must not squash the rest
        out = normalize(img, Normalization(method="percentile", lower=0, upper=99.5))
        assert out.max() == 1.0 and out.min() == 0.0
        assert 0.45 < out[500] < 0.55

    def test_zscore_fixed_none(self) -> None:
        img = np.array([1.0, 2.0, 3.0])
        z = normalize(img, Normalization(method="zscore"))
        assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
        f = normalize(img, Normalization(method="fixed", scale=2.0, offset=-1.0))
        np.testing.assert_allclose(f, [1.0, 3.0, 5.0])
        np.testing.assert_allclose(normalize(img, Normalization(method="none")), img)

    def test_constant_image_is_zero(self) -> None:
        for method in ("minmax", "percentile", "zscore"):
            out = normalize(np.full((4, 4), 7.0), Normalization(method=method))
            np.testing.assert_array_equal(out, 0.0)


def _spec(**changes: object) -> InputSpec:
    data = manifest_dict()["input"]
    data.update(changes)
    return InputSpec(**data)


class TestPreprocess:
    def test_shape_dtype_range(self) -> None:
        frame = np.random.default_rng(3).integers(0, 1000, (100, 80)).astype(np.uint16)
        out = Preprocess(_spec(size=[64, 32]))(frame)
        assert out.shape == (1, 64, 32) and out.dtype == np.float32
        assert out.min() == 0.0 and out.max() <= 1.0

    def test_channels_repeat_and_rgb(self) -> None:
        frame = np.random.default_rng(4).random((10, 10))
        out = Preprocess(_spec(channels=3))(frame)
        assert out.shape == (3, 64, 64)
        np.testing.assert_array_equal(out[0], out[2])
        rgb = np.stack([frame, frame, frame], axis=-1)
        np.testing.assert_allclose(Preprocess(_spec())(rgb), Preprocess(_spec())(frame), atol=1e-6)

    def test_rejects_non_numeric(self) -> None:
        with pytest.raises(ValueError, match=r"frame must be numeric, got dtype <U1"):
            Preprocess(_spec())(np.array([["a"]]))
        with pytest.raises(ValueError, match=r"frame must have shape \(H, W\) or \(H, W, S\)"):
            Preprocess(_spec())(np.zeros((1, 2, 3, 4)))


class TestPostprocess:
    def _post(self, **output: object) -> Postprocess:
        data = manifest_dict()
        data["output"].update(output)
        if data["output"]["activation"] == "softmax":
            data["segments"][0]["channel"] = 1
            data["segments"][1]["channel"] = 2
        manifest = parse_manifest(data)
        return Postprocess(manifest.output, manifest.segments)

    def test_sigmoid_threshold_and_resize_back(self) -> None:
        logits = np.full((2, 8, 8), -5.0, dtype=np.float32)
        logits[0, 2:6, 2:6] = 5.0
        masks = self._post()(logits, (32, 32))
        assert set(masks) == {"thyroid", "nodule"}
        assert masks["thyroid"].shape == (32, 32) and masks["thyroid"].dtype == bool
        # a 4x4 square becomes 16x16 (rows/cols 8-23); bilinear probabilities round its corners
        assert masks["thyroid"][8:24, 9:23].all() and masks["thyroid"][9:23, 8:24].all()
        assert masks["thyroid"].sum() == 16 * 16 - 4
        assert not masks["thyroid"][:8].any() and not masks["thyroid"][:, 24:].any()
        assert not masks["nodule"].any()

    def test_threshold_is_applied_to_probability(self) -> None:
        logits = np.zeros((2, 4, 4))
        logits[0] = np.log(0.6 / 0.4)  # p = 0.6
        assert self._post(threshold=0.5)(logits)["thyroid"].all()
        assert not self._post(threshold=0.7)(logits)["thyroid"].any()

    def test_softmax_argmax(self) -> None:
        logits = np.zeros((3, 4, 4))
        logits[1, :2] = 3.0
        logits[2, 2:, :2] = 3.0
        masks = self._post(activation="softmax")(logits, (4, 4))
        assert masks["thyroid"][:2].all() and not masks["thyroid"][2:].any()
        assert masks["nodule"].sum() == 4

    def test_too_few_channels(self) -> None:
        with pytest.raises(ValueError, match=r"logits have 1 channels, segments need 2"):
            self._post()(np.zeros((1, 4, 4)))

    def test_huge_logits_do_not_overflow(self) -> None:
        logits = np.array([[[1e4, -1e4]], [[0.0, 0.0]]])
        with np.errstate(all="raise"):
            masks = self._post()(logits)
        assert masks["thyroid"].tolist() == [[True, False]]
