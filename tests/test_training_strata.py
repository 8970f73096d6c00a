"""Lesion records, strata and highlighted cases of an evaluation (training.strata, metrics)."""

from __future__ import annotations

import numpy as np

from training import strata
from training.metrics import detection, lesions


def _gland_with_two_nodules() -> tuple[np.ndarray, np.ndarray]:
    gland = np.zeros((40, 40), bool)
    gland[5:35, 5:25] = True
    nodule = np.zeros_like(gland)
    nodule[12:18, 12:18] = True  # well inside
    nodule[25:35, 15:25] = True  # the lower right corner of the gland: half its outline on the edge
    return gland, nodule


class TestLesions:
    def test_inside_and_edge_nodules_are_told_apart(self) -> None:
        gland, nodule = _gland_with_two_nodules()
        inner, corner = lesions(nodule, nodule, gland, spacing=(0.5, 0.5))
        assert inner["edge_fraction"] == 0.0 and inner["coverage"] == 1.0 and inner["found"]
        assert corner["edge_fraction"] > 1 / 3
        assert np.isclose(corner["diameter_mm"], 2 * np.sqrt(100 * 0.25 / np.pi))

    def test_a_nodule_is_found_only_when_half_of_it_is_covered(self) -> None:
        gland, nodule = _gland_with_two_nodules()
        pred = np.zeros_like(nodule)
        pred[12:15, 12:18] = True  # half of the inner nodule
        pred[25:27, 15:25] = True  # a fifth of the corner nodule
        inner, corner = lesions(pred, nodule, gland)
        assert inner["found"] and not corner["found"]
        assert detection(pred, nodule)["detected"] == 1


def _record(name: str, dice: float, counts: float, items: list[dict]) -> dict:
    return {
        "case": name,
        "frame": 0,
        "total_counts": counts,
        "thyroid": {"dice": 0.95, "truth_pixels": 100, "pred_pixels": 100},
        "nodule": {"dice": dice, "truth_pixels": 10, "pred_pixels": 10, "lesions": items},
    }


def _lesion(diameter: float, edge: float, coverage: float) -> dict:
    return {
        "diameter_mm": diameter,
        "edge_fraction": edge,
        "coverage": coverage,
        "found": coverage >= 0.5,
        "pixels": 10,
    }


class TestStrata:
    def test_strata_and_highlights(self) -> None:
        records = [
            _record("a", 0.9, 1e5, [_lesion(20, 0.0, 0.95)]),
            _record("b", 0.1, 2e4, [_lesion(6, 0.6, 0.05)]),  # small, on the edge, low counts
            _record("c", 0.7, 5e5, [_lesion(10, 0.2, 0.52)]),
            _record("d", 0.8, 3e4, [_lesion(7, 0.5, 0.9)]),  # hard and found
        ]
        out = strata.summarise(records, ["thyroid", "nodule"], ["nodule"])["nodule"]
        assert out["location"]["inside"]["lesions"] == 1
        edge = out["location"]["edge"]
        assert (edge["lesions"], edge["found"], edge["sensitivity"]) == (2, 1, 0.5)
        assert np.isclose(edge["mean_coverage"], 0.475)
        assert out["location"]["reaching the edge"]["lesions"] == 3
        assert sum(row["lesions"] for row in out["size"].values()) == 4
        assert sum(row["images"] for row in out["counts"].values()) == 4
        picks = strata.highlights(records, ["thyroid", "nodule"], ["nodule"])
        assert picks["clear fails"][0]["case"] == "b"
        assert picks["surprising successes"][0]["case"] == "d"
        assert picks["borderline"][0]["case"] == "c"
        text = "\n".join(strata.markdown({"strata": {"nodule": out}, "highlights": picks}))
        assert "| location: edge | 2 | 1 | 0.500 | 0.475 |" in text
        assert "### surprising successes" in text
