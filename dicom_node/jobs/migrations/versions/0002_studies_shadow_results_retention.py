"""Issue 8: patient identity per study, shadow runs in their own table, retention tombstones.

Adds ``studies`` (older studies get their row from their next instance), ``shadow_results`` and
``retention_pending``, and moves every shadow run stored as a ``kind = 'shadow'`` job to
``shadow_results`` as a result of the production job of its series and rule (one without such a
job stays where it is; no query lists it).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LOGGER = logging.getLogger("dicom_node.jobs.migrations")

# the tables as this revision knows them (never the live schema, which moves on)
_jobs = sa.table(
    "jobs",
    sa.column("id", sa.Integer),
    sa.column("series_uid", sa.String),
    sa.column("rule", sa.String),
    sa.column("kind", sa.String),
    sa.column("model_name", sa.String),
    sa.column("model_version", sa.String),
    sa.column("created_at", sa.Float),
    sa.column("finished_at", sa.Float),
    sa.column("details", sa.JSON),
)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("patient_key", sa.String(64)),
        sa.Column("first_received", sa.Float, nullable=False),
    )
    shadow_results = op.create_table(
        "shadow_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("production_version", sa.String(32)),
        sa.Column("agreement", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("job_id", "model", name="uq_shadow_job_model"),
    )
    op.create_index("ix_shadow_results_job_id", "shadow_results", ["job_id"])
    op.create_table(
        "retention_pending",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    if context.is_offline_mode():
        op.execute("-- shadow runs stored as jobs (kind = 'shadow') are moved when run online")
        return
    _move_shadow_jobs(op.get_bind(), shadow_results)


def _move_shadow_jobs(conn: sa.Connection, shadow_results: sa.Table) -> None:
    old = conn.execute(sa.select(_jobs).where(_jobs.c.kind == "shadow")).mappings().all()
    moved = 0
    for row in old:
        parent = conn.execute(
            sa.select(_jobs.c.id).where(
                _jobs.c.series_uid == row["series_uid"],
                _jobs.c.rule == row["rule"],
                _jobs.c.kind == "production",
            )
        ).scalar()
        if parent is None or not row["model_name"] or not row["model_version"]:
            continue
        details = row["details"] or {}
        conn.execute(
            sa.insert(shadow_results).values(
                job_id=parent,
                model=row["model_name"],
                version=row["model_version"],
                production_version=details.get("production_version"),
                agreement=details.get("agreement") or {},
                created_at=row["finished_at"] or row["created_at"],
            )
        )
        conn.execute(sa.delete(_jobs).where(_jobs.c.id == row["id"]))
        moved += 1
    if moved:
        LOGGER.info("moved %d shadow run(s) from the jobs table to shadow_results", moved)


def downgrade() -> None:
    op.drop_table("retention_pending")
    op.drop_table("shadow_results")
    op.drop_table("studies")
