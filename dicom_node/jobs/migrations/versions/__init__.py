"""Revisions of the job store schema, oldest first (``0001`` is the first release)."""
