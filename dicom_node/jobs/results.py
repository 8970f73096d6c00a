"""The SEGs of a job: one per group of its series, each with the destinations that have it.

A series that splits into groups (:func:`dicom_node.seg.group_sources`) gives a job several SEGs.
:func:`replace` writes a job's SEGs in the transaction that moves it to ``exporting`` (the rows of
an earlier build of the same job go: a rebuild replaces its result); the export records each
SEG's delivery on its own row, so a retry sends only the SEGs a destination does not have yet.
``jobs.seg_path`` keeps naming the first SEG, for readers that know one SEG per job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, delete, insert, select, update

from dicom_node.jobs.records import SegResult
from dicom_node.jobs.schema import seg_results


def replace(conn: Connection, job_id: int, results: Sequence[SegResult]) -> None:
    """Make ``results`` the SEGs of ``job_id`` inside the caller's transaction.

    Raises
    ------
    ValueError
        Two results share a position.
    """
    positions = [r.position for r in results]
    if len(set(positions)) != len(positions):
        raise ValueError(f"result positions must be unique, got {positions}")
    conn.execute(delete(seg_results).where(seg_results.c.job_id == job_id))
    if results:
        now = time.time()
        conn.execute(
            insert(seg_results),
            [
                {
                    "job_id": job_id,
                    "position": r.position,
                    "path": r.path,
                    "sop_uid": r.sop_uid,
                    "group_key": r.group_key,
                    "n_frames": r.n_frames,
                    "delivered": list(r.delivered),
                    "created_at": now,
                }
                for r in results
            ],
        )


def for_job(engine: Engine, job_id: int) -> list[SegResult]:
    """The SEGs of ``job_id`` by position (empty for a job built before this table existed)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(seg_results)
            .where(seg_results.c.job_id == job_id)
            .order_by(seg_results.c.position)
        ).mappings()
        return [SegResult.from_row(row) for row in rows]


def delivered(engine: Engine, job_id: int, position: int, destinations: Sequence[str]) -> None:
    """Record the destinations that have the SEG at ``position`` of ``job_id`` so far."""
    with engine.begin() as conn:
        record_delivered(conn, job_id, position, destinations)


def record_delivered(
    conn: Connection, job_id: int, position: int, destinations: Sequence[str]
) -> None:
    """:func:`delivered` inside the caller's transaction."""
    conn.execute(
        update(seg_results)
        .where(seg_results.c.job_id == job_id, seg_results.c.position == position)
        .values(delivered=list(destinations))
    )


def delete_for(conn: Connection, job_ids: Sequence[int]) -> None:
    """Delete the result rows of ``job_ids`` (retention; the files go with ``results/``)."""
    for k in range(0, len(job_ids), 500):
        conn.execute(delete(seg_results).where(seg_results.c.job_id.in_(job_ids[k : k + 500])))
