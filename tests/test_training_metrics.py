"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import case_metrics, detection, dice, hd95, iou, label_components, surface


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    for r, c in pixels:
        m[r, c] = True
    return m


class TestOverlap:
    def test_square_in_rectangle(self) -> None:
        pred = np.zeros((4, 4), bool)
        truth = np.zeros((4, 4), bool)
        pred[0:2, 0:2] = True  # 4 pixels
        truth[0:2, 0:3] = True  # 6 pixels, 4 shared
        assert dice(pred, truth) == pytest.approx(0.8)
        assert iou(pred, truth) == pytest.approx(4 / 6)

    def test_disjoint_masks_score_zero(self) -> None:
        a, b = _mask((3, 3), (0, 0)), _mask((3, 3), (2, 2))
        assert dice(a, b) == 0.0 and iou(a, b) == 0.0

    def test_both_empty_score_one_and_one_empty_scores_zero(self) -> None:
        empty = np.zeros((3, 3), bool)
        assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
        assert dice(empty, _mask((3, 3), (1, 1))) == 0.0

    def test_shape_mismatch_is_refused(self) -> None:
        with pytest.raises(ValueError, match="same shape"):
            dice(np.zeros((2, 2), bool), np.zeros((3, 3), bool))


class TestHausdorff:
    def test_single_pixels_use_the_pixel_spacing(self) -> None:
        truth, pred = _mask((2, 5), (0, 0)), _mask((2, 5), (0, 3))
        assert hd95(pred, truth, spacing=(1.0, 2.0)) == pytest.approx(6.0)

    def test_percentile_of_pooled_distances(self) -> None:
        # distances pred->truth [0, 4], truth->pred [0]: 95th percentile of [0, 0, 4] = 3.6
        truth, pred = _mask((5, 1), (0, 0)), _mask((5, 1), (0, 0), (4, 0))
        assert hd95(pred, truth) == pytest.approx(3.6)

    def test_identical_masks_have_zero_distance(self) -> None:
        m = np.zeros((8, 8), bool)
        m[2:6, 1:7] = True
        assert hd95(m, m, (0.5, 0.5)) == 0.0

    def test_empty_masks(self) -> None:
        empty = np.zeros((4, 4), bool)
        assert hd95(empty, empty) == 0.0
        assert math.isnan(hd95(empty, _mask((4, 4), (1, 1))))

    def test_surface_of_a_filled_square_is_its_ring(self) -> None:
        m = np.zeros((5, 5), bool)
        m[1:4, 1:4] = True
        assert surface(m).sum() == 8 and not surface(m)[2, 2]

    def test_case_metrics_keys(self) -> None:
        m = _mask((3, 3), (1, 1))
        assert case_metrics(m, m) == {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}


class TestComponents:
    def test_diagonal_neighbours_are_one_component(self) -> None:
        _, n = label_components(_mask((3, 3), (0, 0), (1, 1), (2, 2)))
        assert n == 1

    def test_u_shape_merges_into_one(self) -> None:
        m = np.zeros((4, 5), bool)
        m[0:3, 0] = True
        m[0:3, 4] = True
        m[3, :] = True
        labels, n = label_components(m)
        assert n == 1 and set(np.unique(labels[m])) == {1}

    def test_separate_blobs_are_counted(self) -> None:
        labels, n = label_components(_mask((5, 5), (0, 0), (0, 4), (4, 2)))
        assert n == 3 and labels.max() == 3

    def test_detection_counts_found_missed_and_false_nodules(self) -> None:
        truth = np.zeros((10, 10), bool)
        truth[1:3, 1:3] = True  # found: half of it covered
        truth[6:8, 6:8] = True  # missed
        truth[6:9, 0:3] = True  # touched (1 of 9 pixels): not found, not a false positive either
        pred = np.zeros((10, 10), bool)
        pred[2:4, 1:3] = True  # covers half of the first
        pred[0, 9] = True  # false positive
        pred[8, 2] = True  # touches the third
        assert detection(pred, truth) == {
            "truth": 3,
            "detected": 1,
            "predicted": 3,
            "false_positives": 1,
        }
