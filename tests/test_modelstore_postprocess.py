"""Post-processing, test-time augmentation and probability maps declared in the manifest.

* each ``postprocess:`` op on crafted masks: a speck removed, the two largest components kept, a
  hole filled (and a nodule at the gland's edge added), a nodule outside the gland dropped,
  components outside a region dropped; 2-D against 3-D connectivity; ``min_size`` in mm² with
  the pixel spacing;
* the manifest keys: defaults are today's behaviour, typos and unknown segments are refused with
  a sentence;
* ``tta: [flip_lr]`` with a real (deliberately left/right asymmetric) ONNX model: the runner's
  masks are exactly the average of the plain and the flipped-back run, thresholded.

The node-level guarantees (SEG masks == ``evaluate`` masks, FRACTIONAL SEG) are in
``tests/test_inference_contract_e2e.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dicom_node.modelstore import (
    ManifestError,
    ModelRunner,
    ResolvedVersion,
    apply_steps,
    load_manifest,
    parse_manifest,
)
from dicom_node.modelstore import morphology as mo
from dicom_node.modelstore.files import sha256_file
from dicom_node.modelstore.processing import Preprocess, activate, slice_spacing
from tests.helpers.onnx_models import manifest_dict, write_yaml

OPSET = 17
GAIN = 20.0
SHIFT = 3
"""The asymmetric model's thyroid channel looks SHIFT columns to the right of each pixel."""


def _steps(*entries: dict[str, Any]) -> list[Any]:
    """Validated ``postprocess:`` steps (through the manifest, as the runner gets them)."""
    data = manifest_dict()
    data["postprocess"] = list(entries)
    return parse_manifest(data).postprocess


def _frames(**masks: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per-frame masks from stacks ``key=(F, H, W)``."""
    n = len(next(iter(masks.values())))
    return [{k: np.asarray(v[i], dtype=bool) for k, v in masks.items()} for i in range(n)]


def _blank(shape: tuple[int, ...] = (1, 20, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


# --------------------------------------------------------------------------- morphology
class TestMorphology:
    def test_diagonal_pixels_join_with_full_connectivity_only(self) -> None:
        mask = np.eye(5, dtype=bool)
        assert mo.label(mask)[1] == 1
        assert mo.label(mask, full=False)[1] == 5

    def test_components_are_numbered_in_raster_order(self) -> None:
        mask = np.zeros((6, 6), bool)
        mask[4:6, 0:2] = True  # second in raster order
        mask[0, 5] = True  # first
        labels, count = mo.label(mask)
        assert count == 2
        assert labels[0, 5] == 1 and labels[5, 1] == 2

    def test_3d_components_join_across_frames(self) -> None:
        volume = np.zeros((3, 5, 5), bool)
        volume[0, 1, 1] = volume[1, 2, 2] = volume[2, 3, 3] = True  # corner to corner
        assert mo.label(volume)[1] == 1
        assert mo.label(volume, full=False)[1] == 3

    @pytest.mark.parametrize("shape", [(30, 40), (6, 20, 25)])
    def test_labels_and_holes_agree_with_simpleitk(self, shape: tuple[int, ...]) -> None:
        sitk = pytest.importorskip("SimpleITK")  # training's dependency: an independent check
        rng = np.random.default_rng(len(shape))
        for trial in range(20):
            mask = rng.random(shape) < rng.uniform(0.1, 0.7)
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            for full in (True, False):
                theirs = sitk.GetArrayFromImage(sitk.ConnectedComponent(image, full))
                ours, count = mo.label(mask, full)
                assert count == theirs.max(), (trial, full)
                # the same partition: every (ours, theirs) label pair is one-to-one
                pairs = set(zip(ours[mask].tolist(), theirs[mask].tolist(), strict=True))
                assert len(pairs) == count, (trial, full)
            filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(image, False)).astype(bool)
            assert np.array_equal(mo.fill_holes(mask), filled), trial

    @pytest.mark.parametrize("full", [True, False])
    def test_large_volume_path_labels_like_the_lookup_path(
        self, monkeypatch: pytest.MonkeyPatch, full: bool
    ) -> None:
        rng = np.random.default_rng(5)
        volume = rng.random((6, 30, 40)) < 0.35
        expected = mo.label(volume, full)
        monkeypatch.setattr(mo, "DIRECT_LOOKUP_LIMIT", 0)  # search among foreground pixels
        got = mo.label(volume, full)
        assert got[1] == expected[1] and np.array_equal(got[0], expected[0])

    def test_a_ring_closed_by_diagonals_has_a_hole(self) -> None:
        ring = np.zeros((7, 7), bool)
        for r, c in [(1, 3), (2, 2), (2, 4), (3, 1), (3, 5), (4, 2), (4, 4), (5, 3)]:
            ring[r, c] = True  # a diamond: only corners touch
        filled = mo.fill_holes(ring)
        assert filled[3, 3] and filled[2, 3] and not filled[0, 0]

    def test_background_touching_the_border_is_no_hole(self) -> None:
        cup = np.zeros((6, 6), bool)
        cup[1:5, 1] = cup[1:5, 4] = cup[4, 1:5] = True  # open at the top
        assert np.array_equal(mo.fill_holes(cup), cup)


# --------------------------------------------------------------------------- each op
class TestOps:
    def test_min_size_removes_a_speck(self) -> None:
        nodule = _blank()
        nodule[0, 2:6, 2:6] = True  # 16 pixels
        nodule[0, 15, 15] = True  # a speck
        (out,) = apply_steps(
            _frames(nodule=nodule), _steps({"op": "min_size", "segment": "nodule", "pixels": 4})
        )
        assert out["nodule"].sum() == 16 and not out["nodule"][15, 15]

    def test_min_size_in_mm2_uses_the_pixel_spacing(self) -> None:
        nodule = _blank()
        nodule[0, 2:4, 2:7] = True  # 10 pixels
        step = _steps({"op": "min_size", "segment": "nodule", "mm2": 30.0, "pixels": 50})
        kept = apply_steps(_frames(nodule=nodule), step, spacing=(2.0, 2.0))  # 40 mm²
        assert kept[0]["nodule"].sum() == 10
        dropped = apply_steps(_frames(nodule=nodule), step, spacing=(1.0, 1.0))  # 10 mm²
        assert dropped[0]["nodule"].sum() == 0
        # spacing unknown: the pixel count given as fallback decides (10 < 50)
        assert apply_steps(_frames(nodule=nodule), step)[0]["nodule"].sum() == 0

    def test_min_size_in_mm2_without_spacing_or_pixels_says_what_to_add(self) -> None:
        step = _steps({"op": "min_size", "segment": "nodule", "mm2": 30.0})
        nodule = _blank()
        nodule[0, 2, 2] = True
        with pytest.raises(ValueError, match="add 'pixels' to the step"):
            apply_steps(_frames(nodule=nodule), step)

    def test_largest_component_keeps_the_two_largest(self) -> None:
        thyroid = _blank()
        thyroid[0, 1:8, 1:5] = True  # 28: left lobe
        thyroid[0, 1:8, 10:13] = True  # 21: right lobe
        thyroid[0, 15:17, 15:17] = True  # 4: a salivary-gland blob
        (out,) = apply_steps(
            _frames(thyroid=thyroid),
            _steps({"op": "largest_component", "segment": "thyroid", "keep": 2}),
        )
        assert out["thyroid"].sum() == 49 and not out["thyroid"][15, 15]

    def test_fill_holes_fills_every_hole(self) -> None:
        thyroid = _blank()
        thyroid[0, 2:10, 2:10] = True
        thyroid[0, 5:7, 5:7] = False
        (out,) = apply_steps(
            _frames(thyroid=thyroid), _steps({"op": "fill_holes", "segment": "thyroid"})
        )
        assert out["thyroid"].sum() == 64

    def test_fill_holes_where_nodule_fills_its_hole_and_its_notch_only(self) -> None:
        thyroid, nodule = _blank(), _blank()
        thyroid[0, 2:12, 2:12] = True
        thyroid[0, 4:6, 4:6] = False  # a hole the nodule fills
        nodule[0, 4:6, 4:6] = True
        thyroid[0, 8:10, 8:10] = False  # a hole without nodule: a real gap, stays
        thyroid[0, 5:8, 10:12] = False  # a notch at the gland's edge where a nodule bulges
        nodule[0, 5:8, 10:13] = True
        nodule[0, 17:19, 17:19] = True  # a nodule far from the gland: not the gland's
        (out,) = apply_steps(
            _frames(thyroid=thyroid, nodule=nodule),
            _steps({"op": "fill_holes", "segment": "thyroid", "where": "nodule"}),
        )
        got = out["thyroid"]
        assert got[4:6, 4:6].all()  # hole under the nodule filled
        assert not got[8:10, 8:10].any()  # hole without nodule kept
        assert got[5:8, 10:13].all()  # the edge nodule is part of the gland now
        assert not got[17:19, 17:19].any()
        assert np.array_equal(out["nodule"], nodule[0])  # the nodule itself is unchanged

    def test_within_drops_a_nodule_outside_the_gland(self) -> None:
        thyroid, nodule = _blank(), _blank()
        thyroid[0, 2:10, 2:10] = True
        nodule[0, 4:6, 4:6] = True  # inside
        nodule[0, 5:7, 10:12] = True  # just outside, touching the edge: kept
        nodule[0, 15:18, 15:18] = True  # outside: dropped
        (out,) = apply_steps(
            _frames(thyroid=thyroid, nodule=nodule),
            _steps({"op": "within", "segment": "nodule", "of": "thyroid"}),
        )
        assert out["nodule"][4:6, 4:6].all() and out["nodule"][5:7, 10:12].all()
        assert not out["nodule"][15:18, 15:18].any()
        (strict,) = apply_steps(
            _frames(thyroid=thyroid, nodule=nodule),
            _steps({"op": "within", "segment": "nodule", "of": "thyroid", "min_inside": 0.5}),
        )
        assert strict["nodule"].sum() == 4  # only the one inside

    def test_keep_in_region_drops_components_centred_outside_the_box(self) -> None:
        thyroid = _blank()
        thyroid[0, 1:3, 8:12] = True  # top of the image (a salivary gland)
        thyroid[0, 10:16, 6:14] = True
        (out,) = apply_steps(
            _frames(thyroid=thyroid),
            _steps({"op": "keep_in_region", "segment": "thyroid", "rows": [0.3, 1.0]}),
        )
        assert not out["thyroid"][1:3].any() and out["thyroid"][10:16, 6:14].all()

    def test_keep_in_region_border_false_drops_what_touches_the_frame_edge(self) -> None:
        thyroid = _blank()
        thyroid[0, 14:, 0:4] = True  # a shoulder in the corner, centred inside the box
        thyroid[0, 8:12, 6:14] = True  # the gland
        steps = {"op": "keep_in_region", "segment": "thyroid", "rows": [0.0, 1.0]}
        (kept,) = apply_steps(_frames(thyroid=thyroid), _steps(steps))
        assert kept["thyroid"][14:, 0:4].all()  # border: true (the default) keeps it
        (out,) = apply_steps(_frames(thyroid=thyroid), _steps({**steps, "border": False}))
        assert not out["thyroid"][14:, 0:4].any() and out["thyroid"][8:12, 6:14].all()

    def test_steps_run_in_order(self) -> None:
        thyroid, nodule = _blank(), _blank()
        thyroid[0, 2:10, 2:10] = True
        nodule[0, 15:18, 15:18] = True
        grow = {"op": "fill_holes", "segment": "thyroid", "where": "nodule"}
        drop = {"op": "within", "segment": "nodule", "of": "thyroid"}
        (first,) = apply_steps(_frames(thyroid=thyroid, nodule=nodule), _steps(drop, grow))
        assert first["nodule"].sum() == 0 and first["thyroid"].sum() == 64

    def test_2d_and_3d_connectivity(self) -> None:
        liver = np.zeros((3, 12, 12), bool)
        liver[:, 2:8, 2:8] = True  # one organ through three slices: 108 voxels
        liver[1, 9:12, 9:12] = True  # a 9-voxel blob on the middle slice, larger than ...
        liver[0, 0, 11] = True  # ... nothing else: on slice 0 the organ is the largest
        frames = _frames(liver=liver)
        data = manifest_dict(segments=[_segment("liver", 0)])
        data["postprocess"] = [{"op": "largest_component", "segment": "liver"}]
        per_frame = apply_steps(frames, parse_manifest(data).postprocess)
        data["postprocess"][0]["connectivity"] = "3d"
        per_volume = apply_steps(frames, parse_manifest(data).postprocess)
        # 2-D: the largest of each slice; the blob of slice 1 is smaller than the organ there
        assert [int(f["liver"].sum()) for f in per_frame] == [36, 36, 36]
        assert [int(f["liver"].sum()) for f in per_volume] == [36, 36, 36]
        # a 3-D speck filter counts voxels over the volume: a component through 3 slices of
        # 4 pixels each (12 voxels) survives 10 voxels in 3-D, but not 10 pixels per frame
        column = np.zeros((3, 12, 12), bool)
        column[:, 0:2, 0:2] = True
        data["postprocess"] = [{"op": "min_size", "segment": "liver", "pixels": 10}]
        assert sum(f["liver"].sum() for f in apply_steps(_frames(liver=column), _m(data))) == 0
        data["postprocess"][0]["connectivity"] = "3d"
        assert sum(f["liver"].sum() for f in apply_steps(_frames(liver=column), _m(data))) == 12

    def test_3d_min_size_in_mm3_needs_the_slice_spacing(self) -> None:
        column = np.zeros((3, 6, 6), bool)
        column[:, 0:2, 0:2] = True  # 12 voxels
        data = manifest_dict(segments=[_segment("liver", 0)])
        data["postprocess"] = [
            {"op": "min_size", "segment": "liver", "mm3": 20.0, "connectivity": "3d"}
        ]
        steps = _m(data)
        kept = apply_steps(_frames(liver=column), steps, spacing=(1.0, 1.0), slice_spacing=2.5)
        assert sum(f["liver"].sum() for f in kept) == 12  # 30 mm³
        dropped = apply_steps(_frames(liver=column), steps, spacing=(1.0, 1.0), slice_spacing=1.0)
        assert sum(f["liver"].sum() for f in dropped) == 0  # 12 mm³
        with pytest.raises(ValueError, match="slice spacing"):
            apply_steps(_frames(liver=column), steps, spacing=(1.0, 1.0))
        assert slice_spacing([0.0, 2.5, 5.0]) == 2.5 and slice_spacing([3.0]) is None

    def test_volumes_keep_groups_apart(self) -> None:
        liver = np.zeros((2, 6, 6), bool)
        liver[0, 0:3, 0:3] = True  # 9 voxels
        liver[1, 4:6, 4:6] = True  # 4 voxels, not touching slice 0's blob
        data = manifest_dict(segments=[_segment("liver", 0)])
        data["postprocess"] = [
            {"op": "largest_component", "segment": "liver", "connectivity": "3d"}
        ]
        one = apply_steps(_frames(liver=liver), _m(data))  # one volume: one component kept
        two = apply_steps(_frames(liver=liver), _m(data), volumes=[[0], [1]])
        assert [int(f["liver"].sum()) for f in one] == [9, 0]
        assert [int(f["liver"].sum()) for f in two] == [9, 4]
        liver[1, 2:4, 2:4] = True  # a bridge: slice 0's blob, the bridge and slice 1's blob
        one = apply_steps(_frames(liver=liver), _m(data))
        assert [int(f["liver"].sum()) for f in one] == [9, 8]

    def test_no_steps_returns_the_masks_unchanged(self) -> None:
        thyroid = _blank()
        thyroid[0, 3, 3] = True
        (out,) = apply_steps(_frames(thyroid=thyroid), [])
        assert np.array_equal(out["thyroid"], thyroid[0])


def _segment(key: str, channel: int) -> dict[str, Any]:
    return {
        "key": key,
        "label": key.title(),
        "channel": channel,
        "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"},
    }


def _m(data: dict[str, Any]) -> list[Any]:
    return parse_manifest(copy.deepcopy(data)).postprocess


# --------------------------------------------------------------------------- manifest keys
class TestManifestKeys:
    def test_defaults_are_todays_behaviour_and_stay_out_of_the_dump(self) -> None:
        manifest = parse_manifest(manifest_dict())
        assert manifest.postprocess == [] and manifest.tta == [] and not manifest.probabilities
        dumped = manifest.to_dict()
        assert not {"postprocess", "tta", "probabilities"} & set(dumped)
        assert manifest.threshold("nodule") == 0.5

    def test_declared_keys_round_trip(self) -> None:
        data = manifest_dict()
        data["tta"] = ["flip_lr"]
        data["probabilities"] = True
        data["segments"][1]["threshold"] = 0.35
        data["postprocess"] = [{"op": "min_size", "segment": "nodule", "mm2": 12.5, "pixels": 3}]
        manifest = parse_manifest(data)
        again = parse_manifest(manifest.to_dict())
        assert again == manifest
        assert again.threshold("nodule") == 0.35 and again.threshold("thyroid") == 0.5

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (
                {"postprocess": [{"op": "largest_componnet", "segment": "thyroid"}]},
                "postprocess: step 0 has unknown op 'largest_componnet'; did you mean "
                "'largest_component'?",
            ),
            (
                {"postprocess": [{"op": "within", "segment": "nodule", "of": "thyroyd"}]},
                "unknown segment 'thyroyd'; did you mean 'thyroid'?",
            ),
            (
                {"postprocess": [{"op": "min_size", "segment": "nodule"}]},
                "min_size needs a size: pixels, mm2 (2d) or mm3 (3d)",
            ),
            (
                {
                    "postprocess": [
                        {"op": "min_size", "segment": "nodule", "mm2": 5, "connectivity": "3d"}
                    ]
                },
                "with connectivity 3d give mm3 or pixels",
            ),
            (
                {"postprocess": [{"op": "fill_holes", "segment": "thyroid", "wher": "nodule"}]},
                "wher: unknown field",
            ),
            (
                {"postprocess": [{"op": "fill_holes", "segment": "thyroid", "where": "thyroid"}]},
                "a segment cannot refer to itself",
            ),
            ({"tta": ["flip_lr", "flip_lr"]}, "each augmentation once"),
            ({"tta": ["rotate90"]}, "tta.0"),
        ],
    )
    def test_mistakes_are_refused_with_a_sentence(
        self, change: dict[str, Any], message: str
    ) -> None:
        data = {**manifest_dict(), **change}
        with pytest.raises(ManifestError) as caught:
            parse_manifest(data, "models/x/1/manifest.yaml")
        assert str(caught.value).startswith("models/x/1/manifest.yaml: ")
        assert message in str(caught.value)

    def test_a_segment_threshold_with_softmax_is_refused(self) -> None:
        data = manifest_dict()
        data["output"]["activation"] = "softmax"
        data["segments"][0]["channel"], data["segments"][1]["channel"] = 1, 2
        data["segments"][1]["threshold"] = 0.3
        with pytest.raises(ManifestError, match="threshold is not used with softmax"):
            parse_manifest(data)


# --------------------------------------------------------------------------- TTA, real ONNX
def asymmetric_model(size: tuple[int, int]) -> bytes:
    """A real ONNX model that is not left/right symmetric, so that ``flip_lr`` changes it.

    Channel 0 (``thyroid``): ``GAIN * (x[r, c + SHIFT] - 0.5)``: bright tissue, SHIFT columns to
    the right. Channel 1 (``nodule``): ``GAIN * (AvgPool7(x) - x - 0.15)``: cold spots.
    """
    kernel = np.zeros((1, 1, 1, 2 * SHIFT + 1), np.float32)
    kernel[0, 0, 0, -1] = 1.0
    nodes = [
        helper.make_node(
            "Constant", [], ["g"], value=helper.make_tensor("g_t", TensorProto.FLOAT, [], [GAIN])
        ),
        helper.make_node(
            "Constant", [], ["h"], value=helper.make_tensor("h_t", TensorProto.FLOAT, [], [0.5])
        ),
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("c_t", TensorProto.FLOAT, [], [0.15])
        ),
        helper.make_node(
            "Conv", ["image", "w"], ["shifted"], pads=[0, SHIFT, 0, SHIFT], kernel_shape=[1, 7]
        ),
        helper.make_node("Sub", ["shifted", "h"], ["t0"]),
        helper.make_node("Mul", ["t0", "g"], ["thyroid"]),
        helper.make_node(
            "AveragePool",
            ["image"],
            ["avg"],
            kernel_shape=[7, 7],
            pads=[3, 3, 3, 3],
            count_include_pad=0,
        ),
        helper.make_node("Sub", ["avg", "image"], ["d0"]),
        helper.make_node("Sub", ["d0", "c"], ["d1"]),
        helper.make_node("Mul", ["d1", "g"], ["nodule"]),
        helper.make_node("Concat", ["thyroid", "nodule"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "asymmetric",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, *size])],
        initializer=[onnx.numpy_helper.from_array(kernel, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_asymmetric_version(
    dest: Path,
    *,
    name: str = "asym",
    version: str = "1",
    size: tuple[int, int] = (64, 64),
    modalities: tuple[str, ...] = (),
    **manifest: Any,
) -> Path:
    """A version folder with :func:`asymmetric_model` and manifest keys ``manifest``."""
    folder = dest / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(asymmetric_model(size))
    data = manifest_dict(
        name=name,
        version=version,
        sha256=sha256_file(folder / "model.onnx"),
        size=size,
        modalities=modalities,
    )
    data.update(copy.deepcopy(manifest))
    write_yaml(folder / "manifest.yaml", data)
    return folder


def resolved_version(folder: Path) -> ResolvedVersion:
    manifest = load_manifest(folder)
    return ResolvedVersion(
        name=manifest.name,
        version=manifest.version,
        alias=None,
        path=folder,
        manifest=manifest,
        sha256=manifest.sha256,
    )


def test_image(seed: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Bright lobes of uneven width with cold spots and noise: asymmetric left/right."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    lobe = ((xx - 0.3) / 0.1) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    lobe |= ((xx - 0.68) / 0.16) ** 2 + ((yy - 0.45) / 0.25) ** 2 <= 1
    cold = ((xx - 0.7) ** 2 + (yy - 0.4) ** 2) <= 0.06**2
    activity = np.where(lobe & ~cold, 1.0, 0.1)
    return rng.poisson(activity * 300).astype(np.float32)


test_image.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


class TestTestTimeAugmentation:
    def test_runner_averages_the_plain_and_the_flipped_back_run(self, tmp_path: Path) -> None:
        import onnxruntime as ort

        folder = write_asymmetric_version(tmp_path, tta=["flip_lr"])
        resolved = resolved_version(folder)
        frames = [test_image(seed) for seed in (1, 2, 3)]
        got = ModelRunner(threads=1).run(resolved, frames)

        session = ort.InferenceSession(
            (folder / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"]
        )
        pre = Preprocess(resolved.manifest.input)
        batch = np.stack([pre(f) for f in frames])
        plain = session.run(None, {"image": batch})[0]
        mirrored = session.run(None, {"image": np.ascontiguousarray(batch[..., ::-1])})[0]
        average = (activate(plain, "sigmoid") + activate(mirrored[..., ::-1], "sigmoid")) / 2
        for n, masks in enumerate(got):
            for channel, key in enumerate(("thyroid", "nodule")):
                np.testing.assert_array_equal(masks[key], average[n, channel] > 0.5)
        # and the augmentation matters for this model: without it the thyroid masks differ
        no_tta = ModelRunner(threads=1).run(
            resolved_version(write_asymmetric_version(tmp_path / "plain")), frames
        )
        assert any(
            not np.array_equal(a["thyroid"], b["thyroid"]) for a, b in zip(got, no_tta, strict=True)
        )

    def test_predict_returns_the_averaged_probabilities_and_the_raw_masks(
        self, tmp_path: Path
    ) -> None:
        steps = [{"op": "min_size", "segment": "nodule", "pixels": 100}]
        folder = write_asymmetric_version(tmp_path, tta=["flip_lr", "flip_ud"], postprocess=steps)
        made = ModelRunner(threads=1).predict(resolved_version(folder), [test_image(4)])
        assert made.tta == ("plain", "flip_lr", "flip_ud")
        (probs,) = made.probabilities or []
        assert probs["thyroid"].dtype == np.float32 and probs["thyroid"].shape == (64, 64)
        assert 0.0 <= probs["nodule"].min() and probs["nodule"].max() <= 1.0
        np.testing.assert_array_equal(made.thresholded[0]["thyroid"], probs["thyroid"] > 0.5)
        # the step removed the small nodule component, the raw masks still have it
        assert made.thresholded[0]["nodule"].sum() > made.masks[0]["nodule"].sum()
        assert np.array_equal(made.masks[0]["thyroid"], made.thresholded[0]["thyroid"])
