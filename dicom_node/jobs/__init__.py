"""jobs: the job store, the only hand-off between stages.

Owns the typed records that cross rooms, the state machine (one transition table), claims and
leases, start-up reconciliation of the spool, and retention.

May import: ``dicom_node.config``, ``dicom_node.metrics``.
"""
