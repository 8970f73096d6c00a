"""Graceful shutdown of ``dicom-node serve``: SIGTERM while jobs are in flight.

What the operator and the PACS notice: the process exits 0 and says it is stopping, nobody can
associate once it is stopping, and after a restart every series ends ``done`` with exactly one
SEG at the PACS.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.jobs.store import JobStore
from tests.conftest import THYROID_RULE, make_config, write_rules
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.peers import StoreSCP, echoscu, storescu
from tests.helpers.waiting import wait_until
from tests.test_node_edge_cases import SilentPeer


def _states(storage: Path) -> list[str]:
    """Job states as a second process (the operator's CLI) reads them from the store."""
    store = JobStore.open(storage)
    try:
        return [j.state for j in store.list_jobs(limit=100)]
    finally:
        store.close()


class TestSigterm:
    def test_sigterm_with_jobs_in_flight_then_restart_delivers_each_seg_once(
        self, tmp_path: Path, models_dir: Path, node_process: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, THYROID_RULE % {"instances": 4})
        n_series = 3
        series = [
            write_series(
                [
                    make_nm(rows=64, cols=64, seed=f"term-{s}", instance_number=i + 1)
                    for i in range(4)
                ],
                tmp_path / f"in{s}",
            )
            for s in range(n_series)
        ]
        files = [f for s in series for f in s]
        # the PACS hangs while the node stops: one job is stuck exporting, the others queued
        hanging = SilentPeer()
        try:
            config = make_config(
                tmp_path, models_dir, rules, hanging.port, workers=1, export_timeout=5.0
            )
            node = node_process(config, tmp_path)
            assert storescu(files, config.port, config.ae_title).returncode == 0
            wait_until(
                lambda: sorted(_states(config.storage)) == ["exporting", "queued", "queued"],
                what="one export in flight and two jobs queued",
            )
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: "stopping" in node.output(), timeout=5, what="the node to say stopping"
            )
            wait_until(
                lambda: "stopped listening" in node.output(),
                timeout=5,
                what="the listener to close",
            )
            assert node.proc.poll() is None, "the export in flight keeps it busy"
            echo = echoscu(config.port, config.ae_title)
            assert echo.returncode != 0, "no association once the node is stopping"
            assert node.proc.poll() is None, "the refusal happened during the shutdown"
            assert node.proc.wait(30) == 0
            log = node.output()
            assert "unfinished job(s) kept in the job store for the next start" in log
            assert "Traceback" not in log
            states = sorted(_states(config.storage))
            assert states == ["exporting", "queued", "queued"], "persisted, not lost or failed"
        finally:
            hanging.close()

        pacs = StoreSCP()
        pacs.port = hanging.port  # the PACS is back where the configuration points
        with pacs:
            node = node_process(config, tmp_path)
            wait_until(
                lambda: _states(config.storage) == ["done"] * n_series,
                timeout=30,
                what="every job done after the restart",
            )
            wait_until(lambda: len(pacs.received()) >= n_series, what="the SEGs at the PACS")
            time.sleep(0.3)
            segs = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]
            assert len(segs) == n_series, "exactly one SEG per series"
            sources = {str(pydicom.dcmread(s[0]).SeriesInstanceUID) for s in series}
            assert {str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) for s in segs} == sources
            assert all(
                len(s.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 4 for s in segs
            )
            assert node.terminate() == 0
            assert "resuming" in node.output()

    def test_an_association_in_progress_at_sigterm_completes_every_c_store(
        self, tmp_path: Path, models_dir: Path, node_process: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, THYROID_RULE % {"instances": 3})
        datasets = [
            make_nm(rows=64, cols=64, seed=f"inflight-{s}", instance_number=i + 1)
            for s in range(2)
            for i in range(3)
        ]
        with StoreSCP() as pacs:
            config = make_config(tmp_path, models_dir, rules, pacs.port)
            node = node_process(config, tmp_path)
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", config.port, ae_title=config.ae_title)
            assert assoc.is_established
            try:
                statuses = [int(assoc.send_c_store(datasets[0]).Status)]
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
                wait_until(
                    lambda: "stopped listening" in node.output() or "stopping" in node.output(),
                    timeout=5,
                    what="the node to start stopping",
                )
                time.sleep(0.5)  # the listener is closed by now; our association lives on
                assert echoscu(config.port, config.ae_title).returncode != 0
                statuses += [int(assoc.send_c_store(ds).Status) for ds in datasets[1:]]
            finally:
                assoc.release()
                ae.shutdown()
            assert statuses == [0x0000] * len(datasets), "the PACS sees no failed C-STORE"
            assert node.proc.wait(30) == 0
            kept = _states(config.storage)
            assert len(kept) == 2 and set(kept) <= {"received", "routed"}, "kept for the restart"

            node = node_process(config, tmp_path)
            wait_until(lambda: _states(config.storage) == ["done", "done"], what="both series done")
            wait_until(lambda: len(pacs.received()) == 2, what="two SEGs")
            segs = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]
            assert all(
                len(s.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 3 for s in segs
            )
            assert node.terminate() == 0

    def test_sigterm_on_an_idle_node_exits_zero_and_frees_the_port(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_process: Any
    ) -> None:
        config = make_config(tmp_path, models_dir, rules_dir, pacs_port=9)
        node = node_process(config, tmp_path)
        assert echoscu(config.port, config.ae_title).returncode == 0
        assert node.terminate(timeout=15) == 0
        log = node.output()
        assert "stopping" in log and "stopped" in log
        assert echoscu(config.port, config.ae_title).returncode != 0


def test_a_tcp_probe_does_not_hold_up_shutdown(
    tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
) -> None:
    config = make_config(tmp_path, models_dir, rules_dir, pacs_port=9)
    node = node_factory(config)
    # a TCP probe (load balancer, Docker/k8s tcpSocket check, port scan): connect, then close
    socket.create_connection(("127.0.0.1", config.port)).close()
    time.sleep(0.2)  # the acceptor may be waiting, or may already have seen the close and ended
    ae = node.scp._ae
    stopper = threading.Thread(target=node.stop)
    stopper.start()
    try:
        stopper.join(5)  # a correct stop takes well under a second here
        assert not stopper.is_alive(), "stop() must not wait for a peer that never associated"
    finally:  # do not leave the stop running past the test: end the acceptor's wait now
        for assoc in ae.active_associations:
            assoc.dul.to_user_queue.put(None)  # what its ACSE timeout would deliver
        stopper.join(10)


def test_serve_log_keeps_uids_out_of_info_lines(
    tmp_path: Path, models_dir: Path, rules_dir: Path, node_process: Any
) -> None:
    with StoreSCP() as pacs:
        config = make_config(tmp_path, models_dir, rules_dir, pacs.port)
        node = node_process(config, tmp_path)
        files = write_series([make_nm(rows=64, cols=64, seed="log-uids")], tmp_path / "in")
        assert storescu(files, config.port, config.ae_title).returncode == 0
        wait_until(lambda: _states(config.storage) == ["done"], what="the job to finish")
        assert node.terminate(timeout=15) == 0
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    uids = {str(source.SOPInstanceUID), str(source.SeriesInstanceUID), str(source.StudyInstanceUID)}
    leaking = [line for line in node.output().splitlines() if any(u in line for u in uids)]
    assert leaking == []
