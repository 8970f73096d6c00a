"""Issue 9: one row per SEG a job built (a series that splits into groups gets several).

``jobs.seg_path`` keeps naming the first SEG: jobs built before this revision have no rows here
and are exported from it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seg_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("group_key", sa.Text),
        sa.Column("n_frames", sa.Integer),
        sa.Column("delivered", sa.JSON),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("job_id", "position", name="uq_seg_result_job_position"),
    )
    op.create_index("ix_seg_results_job_id", "seg_results", ["job_id"])


def downgrade() -> None:
    op.drop_table("seg_results")
