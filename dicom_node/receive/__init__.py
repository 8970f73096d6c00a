"""receive: the DICOM listener, from TCP bytes to an fsynced instance in the spool.

Split by layer, as pynetdicom splits its own (``transport``, ``dul``, ``dimse``, service classes):

- :mod:`~dicom_node.receive.transport`: sockets, listening, TCP_NODELAY, TLS, the association
  server;
- :mod:`~dicom_node.receive._pynetdicom_tuned`: the only module touching pynetdicom's private
  names (DUL/association reactors, DIMSE assembly), pinned by ``tests/test_receive_contract.py``;
- :mod:`~dicom_node.receive.dimse`: the DIMSE fast path's codec (pure bytes in, values out);
- :mod:`~dicom_node.receive.handler`: the C-STORE handler and its status table;
- :mod:`~dicom_node.receive.scp`: :class:`StorageSCP`, what ``node.py`` uses;
- :mod:`~dicom_node.receive.header`: header values read from undecoded bytes;
- :mod:`~dicom_node.receive.spool`: durable, once-only storage of the received bytes.

Each stored instance goes to the job store as a :class:`dicom_node.jobs.records.InstanceRecord`
through a callback.

May import: ``dicom_node.jobs.records``, ``dicom_node.config``, ``dicom_node.metrics``.
"""
