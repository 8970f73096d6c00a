"""The job store's tables as the first release created them (``dicom_node/jobstore.py`` of
commit b0c075f, copied verbatim): tests build a store of that release with ``create_all`` of this
metadata and data written the way that release wrote it, then open it with today's code.

Never edit: it is history. (Shadow runs of that release were ``kind = 'shadow'`` jobs.)
"""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Integer, MetaData, String, Table, Text, UniqueConstraint

metadata = MetaData()

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("series_uid", String(64), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("modality", String(16)),
    Column("path", Text, nullable=False),  # relative to storage
    Column("size", Integer, nullable=False),
    Column("calling_ae", String(16)),
    Column("transfer_syntax", String(64)),
    Column("received_at", Float, nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("modality", String(16)),
    Column("n_instances", Integer, nullable=False, default=0),
    Column("first_received", Float, nullable=False),
    Column("last_received", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_uid", String(64), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("kind", String(16), nullable=False, default="production"),
    Column("state", String(16), nullable=False, index=True),
    Column("rule", String(128)),
    Column("rules_version", String(32)),
    Column("model_ref", String(128)),
    Column("model_name", String(64)),
    Column("model_version", String(32)),
    Column("model_alias", String(32)),
    Column("model_sha256", String(64)),
    Column("destinations", JSON),
    Column("delivered", JSON),
    Column("complete_instances", Integer),
    Column("complete_idle", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("export_attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False, default=0.0),
    Column("lease_until", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("queued_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("n_instances", Integer),
    Column("seg_path", Text),
    Column("seg_sop_uid", String(64)),
    Column("outcome", Text),  # human-readable: why skipped, what was delivered
    Column("error", Text),
    Column("details", JSON),
    UniqueConstraint("series_uid", "rule", "kind", name="uq_job_series_rule_kind"),
)
