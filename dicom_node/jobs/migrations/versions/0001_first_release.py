"""The first released schema: instances, series, jobs (shadow runs were ``kind = 'shadow'`` jobs).

As ``dicom_node/jobstore.py`` created it (commits c3b478b to 4f23417). Frozen here: later
changes of ``dicom_node/jobs/schema.py`` go into later revisions, never into this one.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("transfer_syntax", sa.String(64)),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_index("ix_instances_series_uid", "instances", ["series_uid"])
    op.create_table(
        "series",
        sa.Column("series_uid", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("n_instances", sa.Integer, nullable=False),
        sa.Column("first_received", sa.Float, nullable=False),
        sa.Column("last_received", sa.Float, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("rule", sa.String(128)),
        sa.Column("rules_version", sa.String(32)),
        sa.Column("model_ref", sa.String(128)),
        sa.Column("model_name", sa.String(64)),
        sa.Column("model_version", sa.String(32)),
        sa.Column("model_alias", sa.String(32)),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("destinations", sa.JSON),
        sa.Column("delivered", sa.JSON),
        sa.Column("complete_instances", sa.Integer),
        sa.Column("complete_idle", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("export_attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("lease_until", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("queued_at", sa.Float),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("n_instances", sa.Integer),
        sa.Column("seg_path", sa.Text),
        sa.Column("seg_sop_uid", sa.String(64)),
        sa.Column("outcome", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("details", sa.JSON),
        sa.UniqueConstraint("series_uid", "rule", "kind", name="uq_job_series_rule_kind"),
    )
    op.create_index("ix_jobs_series_uid", "jobs", ["series_uid"])
    op.create_index("ix_jobs_state", "jobs", ["state"])


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("series")
    op.drop_table("instances")
