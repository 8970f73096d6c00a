"""Hostile and broken peers against a running node (issue 10, items 2 and 3).

Raw sockets play the attacker: PDUs that declare absurd lengths, connections that send half a PDU
and then nothing, one host that opens every connection it can. Each test checks what the node
does to the bad peer (aborted, closed, refused: counted) and that a real C-ECHO from a well-behaved
peer still succeeds while the bad peers keep their sockets open.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import metrics
from dicom_node.config import NodeConfig
from tests.conftest import make_config
from tests.helpers.metrics import sample
from tests.helpers.ports import free_port
from tests.helpers.raw_dicom import (
    associate_rq,
    closed_by_peer,
    open_association,
    p_data,
    pdu_header,
    pdv,
)

NODE_AE = "DICOMNODE"
OTHER_HOST = "127.0.0.2"
"""Linux loopback answers all of 127/8: a client bound here is "another host" to the node."""


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def echo(port: int, source: str = "127.0.0.1") -> tuple[bool, Any]:
    """One C-ECHO from ``source`` with pynetdicom: (succeeded, association)."""
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(source, 0))
    if not assoc.is_established:
        return False, assoc
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0x0000, assoc
    finally:
        assoc.release()


def echo_within(port: int, seconds: float, source: str = "127.0.0.1") -> float:
    """Retry C-ECHO until it succeeds; return the seconds it took (fail after ``seconds``)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if echo(port, source)[0]:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"no C-ECHO from {source} succeeded within {seconds} s")


def counted(outcome: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("dicom_node_associations_total", {"outcome": outcome})
        or 0.0
    )


@pytest.fixture
def raw_sockets() -> Iterator[Callable[..., socket.socket]]:
    """Open raw client sockets (optionally bound to another loopback address); all closed after."""
    opened: list[socket.socket] = []

    def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        opened.append(sock)
        return sock

    yield connect
    for sock in opened:
        sock.close()


@pytest.fixture
def start(
    tmp_path: Path,
    models_dir: Path,
    rules_dir: Path,
    node_factory: Callable[[NodeConfig], Any],
) -> Callable[..., Any]:
    """Start an in-process node with config ``overrides``; returns the node."""

    def run(**overrides: Any) -> Any:
        config = make_config(tmp_path, models_dir, rules_dir, free_port(), **overrides)
        return node_factory(config)

    return run


class TestOversizedPdu:
    def test_four_2_gib_association_requests_are_aborted_without_memory_growth(
        self,
        tmp_path: Path,
        models_dir: Path,
        rules_dir: Path,
        node_process: Callable[..., Any],
        raw_sockets: Callable[..., socket.socket],
    ) -> None:
        config = make_config(tmp_path, models_dir, rules_dir, free_port())
        proc = node_process(config, tmp_path)
        pid = proc.proc.pid
        port, http_port = config.port, config.http_port
        before = rss_bytes(pid)
        bad = [raw_sockets(port) for _ in range(4)]
        for sock in bad:
            sock.sendall(pdu_header(0x01, 2**31))  # A-ASSOCIATE-RQ "of 2 GiB", then nothing
        answers = [closed_by_peer(sock, timeout=5) for sock in bad]
        time.sleep(1.0)  # what an up-front allocation would have touched by now
        grown = rss_bytes(pid) - before
        assert grown < 100 * 2**20, f"node RSS grew by {grown / 2**20:.0f} MB"
        for closed, received in answers:
            assert closed, "the node kept a connection that declared a 2 GiB PDU"
            assert received[:1] == b"\x07", f"expected an A-ABORT first, got {received[:10]!r}"
        # the bad peers keep their sockets open; a real C-ECHO still succeeds at once
        assert echo(port)[0]
        assert sample(http_port, "dicom_node_associations_total", outcome="pdu_too_large") == 4
        assert "declared a PDU of type 0x01 of 2147483648 bytes" in proc.output()

    def test_p_data_over_the_advertised_maximum_is_aborted(self, start: Callable[..., Any]) -> None:
        node = start(max_pdu=16384)
        before = counted("pdu_too_large")
        sock = open_association(node.dicom_port)
        try:
            sock.sendall(pdu_header(0x04, 16384 + 1))
            closed, received = closed_by_peer(sock, timeout=5)
        finally:
            sock.close()
        assert closed and received[:1] == b"\x07"
        assert counted("pdu_too_large") == before + 1
        assert echo(node.dicom_port)[0]

    def test_p_data_up_to_the_advertised_maximum_is_read(self, start: Callable[..., Any]) -> None:
        node = start(max_pdu=16384)
        sock = open_association(node.dicom_port)
        try:
            # a whole command fragment (not the last one) of exactly the maximum body length
            sock.sendall(p_data(pdv(1, 0x01, b"\x00" * (16384 - 6))))
            closed, received = closed_by_peer(sock, timeout=1.0)
            assert not closed and received == b""
        finally:
            sock.close()


class TestSilentPeers:
    def test_six_silent_partial_pdus_do_not_lock_out_a_real_sender(
        self, start: Callable[..., Any], raw_sockets: Callable[..., socket.socket]
    ) -> None:
        node = start(max_associations=4, acse_timeout=2)
        port = node.dicom_port
        before = counted("timed_out")
        silent = [raw_sockets(port) for _ in range(6)]
        for i, sock in enumerate(silent):
            if i % 2:
                sock.sendall(associate_rq()[:40])  # half an A-ASSOCIATE-RQ, then nothing
            # the others send nothing at all
        took = echo_within(port, seconds=10)
        assert took < 8
        for sock in silent:
            closed, _ = closed_by_peer(sock, timeout=5)
            assert closed, "a silent peer still holds its connection after acse_timeout"
        assert counted("timed_out") >= before + 4  # those admitted (the rest: host_limit)

    @pytest.mark.parametrize("where", ["inside_a_pdu", "between_pdus_of_a_message"])
    def test_a_peer_stalled_mid_dimse_is_dropped_and_its_slot_freed(
        self, start: Callable[..., Any], where: str
    ) -> None:
        node = start(max_associations=1, dimse_timeout=2, network_timeout=30)
        port = node.dicom_port
        before = counted("timed_out")
        sock = open_association(port)
        try:
            if where == "inside_a_pdu":
                sock.sendall(pdu_header(0x04, 1000) + b"\x00" * 10)
            else:  # a command fragment without its "last" bit: the message never ends
                sock.sendall(p_data(pdv(1, 0x01, b"\x00\x00\x00\x00")))
            assert not echo(port)[0]  # the one slot is taken
            start_wait = time.monotonic()
            closed, received = closed_by_peer(sock, timeout=10)
            waited = time.monotonic() - start_wait
        finally:
            sock.close()
        assert closed, f"a peer stalled {where} was not dropped"
        assert 1.0 < waited < 8, f"dropped after {waited:.1f} s, dimse_timeout is 2 s"
        assert received[:1] == b"\x07"
        assert counted("timed_out") == before + 1
        echo_within(port, seconds=3)

    def test_an_idle_association_is_dropped_after_network_timeout(
        self, start: Callable[..., Any]
    ) -> None:
        node = start(max_associations=1, network_timeout=2)
        sock = open_association(node.dicom_port)
        try:
            closed, received = closed_by_peer(sock, timeout=10)
        finally:
            sock.close()
        assert closed and received[:1] == b"\x07"
        echo_within(node.dicom_port, seconds=3)


class TestPerHostLimit:
    def test_one_host_at_its_limit_does_not_lock_out_another(
        self, start: Callable[..., Any], raw_sockets: Callable[..., socket.socket]
    ) -> None:
        node = start(max_associations=4, max_associations_per_host=2, acse_timeout=30)
        port = node.dicom_port
        before = counted("host_limit")
        hogs = [raw_sockets(port) for _ in range(4)]
        for sock in hogs:
            sock.sendall(associate_rq()[:40])  # stalls in negotiation for acse_timeout
        refused = [sock for sock in hogs if closed_by_peer(sock, timeout=4)[0]]
        assert len(refused) == 2, "two of the four connections should be refused at once"
        assert counted("host_limit") == before + 2
        # the other host gets its slots at once, twice over, while the hog stays connected
        # (retried within 5 s only for a loaded machine: the hog holds its slots for 30 s)
        echo_within(port, seconds=5, source=OTHER_HOST)
        echo_within(port, seconds=5, source=OTHER_HOST)
        # the hog's own next association is refused by the limit (counted); the A-ASSOCIATE-RJ
        # bytes themselves are asserted on a raw socket below: pynetdicom as the caller saw an
        # abort instead of the reject once in a clean-clone CI run under full load
        ok, _assoc = echo(port)
        assert not ok
        assert counted("host_limit") == before + 3

    def test_refusal_is_an_association_reject_local_limit_exceeded(
        self, start: Callable[..., Any], raw_sockets: Callable[..., socket.socket]
    ) -> None:
        node = start(max_associations=2, max_associations_per_host=1)
        holder = raw_sockets(node.dicom_port)
        holder.sendall(associate_rq()[:40])
        time.sleep(0.3)
        refused = raw_sockets(node.dicom_port)
        refused.sendall(associate_rq())
        closed, received = closed_by_peer(refused, timeout=5)
        assert closed
        # A-ASSOCIATE-RJ: result 2 (transient), source 3 (presentation), reason 2 (local limit)
        assert received == bytes((0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2))

    def test_per_host_limit_is_capped_at_max_associations(self, start: Callable[..., Any]) -> None:
        node = start(max_associations=2)  # max_associations_per_host defaults to 8
        server = node.scp._server
        assert server is not None and server.max_per_host == 2
