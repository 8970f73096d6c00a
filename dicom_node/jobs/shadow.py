"""Shadow results: what a shadow model version made of a production job's frames.

A shadow run is never exported and is not a job: it is a row of ``shadow_results`` that points at
the production job it shadowed, with the per-segment Dice agreement against that job's masks
(``agreement``, as always) and, since revision 0004, its 3-D Dice, IoU and HD95 in mm over the
whole series (``scores``; None where there is no value, never NaN).
``dicom-node models show`` summarises them; ``dicom-node jobs`` does not list them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from sqlalchemy import Engine, delete, insert, null, select

from dicom_node.jobs.queries import reading
from dicom_node.jobs.records import ShadowResult, check_agreement, check_scores
from dicom_node.jobs.schema import shadow_results


def add_shadow_result(
    engine: Engine,
    job_id: int,
    model: str,
    version: str,
    agreement: Mapping[str, float],
    production_version: str | None = None,
    scores: Mapping[str, Mapping[str, float | None]] | None = None,
) -> None:
    """Record a shadow run on ``job_id``'s frames; it replaces an earlier run of ``model`` on
    that job (a re-opened job is rebuilt, and so is its comparison).

    Raises
    ------
    TypeError, ValueError
        ``agreement`` is not a mapping of segment key to a Dice value in [0, 1], or ``scores``
        not one of segment key to ``{dice, iou, hd95_mm}`` (Dice and IoU in [0, 1], HD95 >= 0,
        each finite or None).
    """
    values = check_agreement(agreement)
    measured = None if scores is None else check_scores(scores)
    with engine.begin() as conn:
        conn.execute(
            delete(shadow_results).where(
                shadow_results.c.job_id == job_id, shadow_results.c.model == model
            )
        )
        conn.execute(
            insert(shadow_results).values(
                job_id=job_id,
                model=model,
                version=version,
                production_version=production_version,
                agreement=values,
                scores=null() if measured is None else measured,  # SQL NULL, not 'null'
                created_at=time.time(),
            )
        )


def shadow_results_for(
    engine: Engine, model: str | None = None, limit: int = 1000
) -> list[ShadowResult]:
    """The latest shadow results first, optionally only those of ``model``."""
    stmt = select(shadow_results).order_by(shadow_results.c.id.desc()).limit(limit)
    if model is not None:
        stmt = stmt.where(shadow_results.c.model == model)
    with reading(engine) as conn:
        return [ShadowResult.from_row(r) for r in conn.execute(stmt).mappings()]
