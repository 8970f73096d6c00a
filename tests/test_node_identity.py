"""Wrong patient (issue 10 item 1) through a running node with a PACS stand-in (DCMTK storescp).

Study S1 (patient A, series X) gets its SEG; an instance of study S2 (patient B) carrying the same
SeriesInstanceUID is refused with 0xA904 and never joins A's series: exactly one SEG reaches the
PACS, under patient A, built from A's instances only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]

from dicom_node.receive.handler import STATUS_IDENTITY_CONFLICT, STATUS_SUCCESS
from tests.conftest import make_config
from tests.helpers.dicom_factory import make_nm
from tests.helpers.peers import StoreSCP
from tests.helpers.waiting import wait_until


def send(port: int, items: list[Any]) -> list[int]:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(NuclearMedicineImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(rsp.Status) if (rsp := assoc.send_c_store(ds)) else -1 for ds in items]
    finally:
        assoc.release()


class TestWrongPatient:
    def test_same_series_uid_of_another_patient_is_refused_and_one_seg_goes_back(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        with StoreSCP(aet="ORTHANC") as pacs:
            config = make_config(tmp_path, models_dir, rules_dir, pacs.port)
            node = node_factory(config)
            a = make_nm(rows=64, cols=64, seed="s1", PatientID="PAT-A", PatientName="DOE^ANNA")
            assert send(config.port, [a]) == [STATUS_SUCCESS]
            wait_until(lambda: pacs.received(), what="S1's SEG at the PACS", timeout=60)

            b = make_nm(
                rows=64,
                cols=64,
                seed="s2",
                series_uid=str(a.SeriesInstanceUID),
                PatientID="PAT-B",
                PatientName="ROE^BEN",
            )
            assert b.StudyInstanceUID != a.StudyInstanceUID
            # and A's instance re-sent under patient B (same SOP Instance UID)
            a_as_b = make_nm(rows=64, cols=64, seed="s1", PatientID="PAT-B", PatientName="ROE^BEN")
            statuses = send(config.port, [b, a_as_b])
            assert statuses == [STATUS_IDENTITY_CONFLICT, STATUS_IDENTITY_CONFLICT]

            time.sleep(3 * config.poll_interval + 1.0)  # room for a wrong second SEG to appear
            segs = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]
            assert len(segs) == 1
            assert segs[0].PatientID == "PAT-A"
            refs = {
                str(i.ReferencedSOPInstanceUID)
                for s in segs[0].ReferencedSeriesSequence
                for i in s.ReferencedInstanceSequence
            }
            assert refs == {str(a.SOPInstanceUID)}
            (job,) = node.store.list_jobs()
            assert job.state == "done" and job.n_instances == 1
