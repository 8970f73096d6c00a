"""tools/phantom_ceiling.py: the reference Dice of a perfect iso-contour reader of the phantoms."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from dicom_node.demo import phantoms_alt, phantoms_c, phantoms_d

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "phantom_ceiling.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("phantom_ceiling", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sharp_disc_is_read_exactly_and_a_faint_rim_is_not() -> None:
    tool = _tool()
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    disc = r < 12
    dice, _ = tool.best_isocontour_dice(disc.astype(float), disc)
    assert dice == pytest.approx(1.0)
    # activity that fades to nothing over the outer 6 pixels: the outline is not in the image
    faded = np.clip((12 - r) / 6, 0, 1) ** 3
    dice_faded, _ = tool.best_isocontour_dice(faded, disc)
    assert dice_faded < 0.95


@pytest.mark.parametrize(
    ("family", "module", "anatomy_salt", "study_salt"),
    [("B", phantoms_alt, 11, 12), ("C", phantoms_c, 31, 32), ("D", phantoms_d, 0, 0)],
)
def test_renders_the_same_study_as_make_case(
    family: str, module: ModuleType, anatomy_salt: int, study_salt: int
) -> None:
    """The noise-free image is the expected counts of the very study make_case writes."""
    tool = _tool()
    case = module.make_case(123, 64, anatomy_seed=77)
    expected, truth, _ = tool.RENDERERS[family](123, 77, 64)
    assert np.array_equal(truth["thyroid"], case.truth["thyroid"])
    counts = case.dataset.pixel_array.astype(float)
    assert np.corrcoef(expected.ravel(), counts.ravel())[0, 1] > 0.8


def test_command_line_prints_the_mean_for_a_family() -> None:
    out = subprocess.run(
        [sys.executable, str(TOOL), "--family", "C", "--seed", "5", "--size", "64", "--n", "3"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "family C, 64x64, seed 5: 3 cases, best iso-contour thyroid Dice mean 0." in out
