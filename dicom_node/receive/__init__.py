"""receive: the DICOM listener, from TCP bytes to an fsynced instance in the spool.

Owns the transport and DUL tuning (``transport``), the C-STORE handler and its statuses (``scp``),
header reading (``header``) and the spool (``spool``). It hands each stored instance to the job
store as a :class:`dicom_node.jobs.records.InstanceRecord` through a callback.

May import: ``dicom_node.jobs`` records, ``dicom_node.config``, ``dicom_node.metrics``.
"""
