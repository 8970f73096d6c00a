"""What a version's report measures, per segment: the manifest's ``measurements:`` block.

```yaml
measurements:
  thyroid:                 # a segment key
    laterality: split      # a paired organ: left / right share of its counts
  nodule:
    components: true       # per connected component: count, area, equivalent diameter, counts
    min_component_pixels: 4
```

Every segment, listed or not, gets :class:`SegmentMeasurements`' defaults: its size (area in mm2,
volume in ml for a volumetric group) and the sum and mean of the source pixel values inside (counts
for NM). A manifest without ``measurements:`` therefore reports what every version reported before
the block existed. Nothing here knows an organ: the thyroid model's manifest asks for its lobar
split and its nodules, another model asks for what its segments need.

Pure pydantic (the model store may import nothing of the node); the numbers are computed by
:mod:`dicom_node.outputs.measurements`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

COUNT_STATISTICS: tuple[Literal["sum", "mean"], ...] = ("sum", "mean")
"""Statistics of the source pixel values inside a region that a report can give."""


class SegmentMeasurements(BaseModel):
    """The measurements of one segment (one entry of ``measurements:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: bool = True
    """Area in mm2 (planar sources: summed over frames) or volume in ml (a volumetric group)."""
    counts: tuple[Literal["sum", "mean"], ...] = COUNT_STATISTICS
    """Statistics of the source pixel values inside (Modality LUT applied); ``[]``: none."""
    components: bool = False
    """Per connected component (8 neighbours in a frame, 26 in a volume), largest first: its
    size, equivalent diameter (of the circle or sphere of that size) and counts, and the number
    of components."""
    min_component_pixels: int = Field(default=1, ge=1, le=1_000_000)
    """Components smaller than this many pixels (voxels) are neither counted nor measured."""
    laterality: Literal["none", "split"] = "none"
    """``split``: a paired organ; its pixels are divided at the midline (the thinnest column of
    the segment in the central third of its width) and the report gives each side's size, counts
    and share of the counts in percent. Which side is the patient's left comes from the source's
    ImageOrientationPatient, PatientOrientation or (planar NM) anterior / posterior view code;
    without any of them the split is left out (the node logs why)."""

    @field_validator("counts")
    @classmethod
    def _once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"each statistic once, got {dupes} twice")
        return value


DEFAULT_MEASUREMENTS = SegmentMeasurements()
"""What a segment the manifest does not list gets: size, sum and mean."""


def measurements_for(
    plan: Mapping[str, SegmentMeasurements] | None, key: str
) -> SegmentMeasurements:
    """The measurements of segment ``key`` under ``plan`` (the manifest's ``measurements``)."""
    if not plan:
        return DEFAULT_MEASUREMENTS
    return plan.get(key, DEFAULT_MEASUREMENTS)


__all__ = ["COUNT_STATISTICS", "DEFAULT_MEASUREMENTS", "SegmentMeasurements", "measurements_for"]
