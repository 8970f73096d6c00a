"""Alembic's environment for the job store: run by :mod:`dicom_node.jobs.migrations`.

The connection (online) or the URL (offline, ``dicom-node migrate --sql``) comes from the
Alembic ``Config``'s attributes, never from an ``alembic.ini`` in the operator's folder.
"""

from __future__ import annotations

from alembic import context

from dicom_node.jobs.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # offline: print the SQL of the chain for this URL's dialect
    context.configure(
        url=config.attributes["url"],
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()
else:  # online, inside the caller's transaction (it holds the migration lock)
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
