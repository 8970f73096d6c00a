"""jobs: the job store, the only hand-off between stages.

Owns the typed records that cross rooms (:mod:`.records`), the state machine with its one
transition table (:mod:`.states`, enforced by :mod:`.transitions`), claims and leases, start-up
reconciliation of the spool (:mod:`.reconcile`), shadow results (:mod:`.shadow`), and retention
(:mod:`.retention`: the files of old finished series). The tables (:mod:`.schema`) are touched
only inside this package; other rooms use :class:`JobStore` and the records. The C-STORE path
is :mod:`.ingest`, the reads :mod:`.queries`.

May import: ``dicom_node.config``, ``dicom_node.metrics``.
"""

from dicom_node.jobs.records import (
    IdentityConflict,
    Instance,
    InstanceRecord,
    Job,
    Route,
    SegResult,
    Series,
    ShadowResult,
    one_patient_one_study,
)
from dicom_node.jobs.states import TERMINAL, TRANSITIONS, JobState, TransitionError
from dicom_node.jobs.store import JobStore

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "IdentityConflict",
    "Instance",
    "InstanceRecord",
    "Job",
    "JobState",
    "JobStore",
    "Route",
    "SegResult",
    "Series",
    "ShadowResult",
    "TransitionError",
    "one_patient_one_study",
]
