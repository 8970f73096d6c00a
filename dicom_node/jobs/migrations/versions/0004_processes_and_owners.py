"""Issue 11: several processes on one store: ``processes``, ``jobs.owner``; wider columns.

Issue 14: ``shadow_results.scores`` (per segment 3-D Dice, IoU and HD95 of a shadow run).

Every ``dicom-node serve`` process registers in ``processes`` and heartbeats there; a claimed
job names its process in ``jobs.owner`` (existing jobs have none: a job ``running`` from before
has no live owner and is taken back after its lease like any other). On PostgreSQL, which
enforces widths, file sizes become 64-bit and model versions and references as wide as the model
store allows (SQLite enforces neither).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "processes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("version", sa.String(32)),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("stopped_at", sa.Float),
        sa.Column("details", sa.JSON),
    )
    op.add_column("jobs", sa.Column("owner", sa.String(64)))
    op.create_index("ix_jobs_state_lease_until", "jobs", ["state", "lease_until"])
    # issue 14: shadow agreement as 3-D Dice, IoU and HD95 per segment (null on older runs)
    op.add_column("shadow_results", sa.Column("scores", sa.JSON))
    if op.get_context().dialect.name == "sqlite":
        return  # SQLite enforces neither integer nor string widths: nothing to rebuild
    for table in ("instances", "retention_pending"):
        op.alter_column(
            table,
            "size",
            type_=sa.BigInteger(),
            existing_type=sa.Integer(),
            existing_nullable=False,
        )
    # model versions may have 64 characters (dicom_node/modelstore/refs.py), references 129
    for table, column, old, new, nullable in (
        ("jobs", "model_ref", 128, 192, True),
        ("jobs", "model_version", 32, 64, True),
        ("shadow_results", "version", 32, 64, False),
        ("shadow_results", "production_version", 32, 64, True),
    ):
        op.alter_column(
            table,
            column,
            type_=sa.String(new),
            existing_type=sa.String(old),
            existing_nullable=nullable,
        )


def downgrade() -> None:
    op.drop_column("shadow_results", "scores")
    op.drop_index("ix_jobs_state_lease_until", table_name="jobs")
    op.drop_column("jobs", "owner")
    op.drop_table("processes")
