"""Contract with pynetdicom: every private name, signature and behaviour the receive path relies on.

``dicom_node/receive/_pynetdicom_tuned.py`` subclasses pynetdicom's DUL, DIMSE, Association,
socket and request handler and copies two of its reactor loops. pyproject pins pynetdicom to
``>=3.0.4,<3.1``; when someone moves the pin, these tests name what changed. The copied loops are
pinned by a hash of pynetdicom's source: a release that edits them fails here even if every name
still exists, because our copy would silently keep the old behaviour.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import queue
import textwrap
from collections.abc import Callable
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE, _config, _handlers, evt, fsm
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.receive import _pynetdicom_tuned as tuned

VERSION = pynetdicom.__version__
TUNED = "dicom_node/receive/_pynetdicom_tuned.py"


def broken(name: str, what: str = "changed private name") -> str:
    return (
        f"pynetdicom {VERSION} {what} {name} that {TUNED} relies on; re-measure and adapt "
        "(see the module docstring for the measurement)"
    )


def require(owner: Any, *names: str, label: str) -> None:
    for name in names:
        assert hasattr(owner, name), broken(f"{label}.{name}")


def params(func: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(func).parameters)


def source_sha(func: Callable[..., Any]) -> str:
    source = textwrap.dedent(inspect.getsource(func))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@pytest.fixture
def acceptor() -> Association:
    """A fresh (not started) acceptor association of pynetdicom's own class."""
    ae = AE()
    return Association(ae, "acceptor")


class TestVersion:
    def test_installed_version_is_the_pinned_minor(self) -> None:
        assert VERSION.startswith("3.0."), (
            f"pynetdicom {VERSION} is installed but {TUNED} was measured against 3.0.x "
            "(pyproject pins >=3.0.4,<3.1); re-measure and adapt, then move the pin"
        )


class TestModules:
    def test_config_flag(self) -> None:
        assert isinstance(_config.STORE_RECV_CHUNKED_DATASET, bool), broken(
            "_config.STORE_RECV_CHUNKED_DATASET"
        )

    def test_standard_log_handlers_exist_and_are_bound_by_default(
        self, acceptor: Association
    ) -> None:
        require(
            _handlers,
            "standard_dimse_recv_handler",
            "standard_dimse_sent_handler",
            "standard_pdu_recv_handler",
            "standard_pdu_sent_handler",
            label="_handlers",
        )
        for event, handler in tuned.STANDARD_LOG_HANDLERS:
            bound = [h[0] if isinstance(h, tuple) else h for h in acceptor.get_handlers(event)]
            assert handler in bound, broken(
                f"the default binding of _handlers.{handler.__name__} to {event.name}",
                "changed",
            )

    def test_fsm_data_transfer_actions(self) -> None:
        """The DUL fast path does what DT-2 does; the association thread sends what DT-1 would."""
        assert fsm.TRANSITION_TABLE[("Evt10", "Sta6")] == "DT-2", broken("fsm Sta6+Evt10")
        assert fsm.TRANSITION_TABLE[("Evt9", "Sta6")] == "DT-1", broken("fsm Sta6+Evt9")
        assert fsm.ACTIONS["DT-2"][2] == "Sta6", broken("fsm.ACTIONS['DT-2']")
        assert fsm.ACTIONS["DT-1"][2] == "Sta6", broken("fsm.ACTIONS['DT-1']")
        dt2 = inspect.getsource(fsm.DT_2)
        assert "dul.assoc.dimse.receive_primitive" in dt2, broken("fsm.DT_2", "changed")


class TestCopiedCode:
    """Code the tuned module copies or replaces wholesale: pinned by a hash of its source."""

    @pytest.mark.parametrize(
        ("name", "func", "sha"),
        [
            ("DULServiceProvider.run_reactor", DULServiceProvider.run_reactor, "780cd7ed323ef3bb"),
            (
                "DULServiceProvider._read_pdu_data",
                DULServiceProvider._read_pdu_data,
                "4679cb00a659ff5f",
            ),
            ("Association._run_reactor", Association._run_reactor, "cbf8d3c3eb37093a"),
            (
                "RequestHandler._create_association",
                RequestHandler._create_association,
                "4ad65038b9aedd36",
            ),
            (
                "DIMSEServiceProvider.receive_primitive",
                DIMSEServiceProvider.receive_primitive,
                "4307baf82f143a89",
            ),
            ("DIMSEServiceProvider.send_msg", DIMSEServiceProvider.send_msg, "b285f58a41affc09"),
            # NodeDIMSE._serve_inline does what these two do for a C-STORE-RQ
            ("Association._serve_request", Association._serve_request, "b9dad50a37d68ef7"),
            ("StorageServiceClass.SCP", StorageServiceClass.SCP, "e52a51b4066c9fc1"),
        ],
    )
    def test_source_is_the_one_measured(
        self, name: str, func: Callable[..., Any], sha: str
    ) -> None:
        assert source_sha(func) == sha, broken(name, "changed the code of")


class TestDUL:
    def test_names(self, acceptor: Association) -> None:
        dul = acceptor.dul
        require(
            dul,
            "_kill_thread",
            "_run_loop_delay",
            "_idle_timer",
            "_recv_pdu",
            "_decode_pdu",
            "_process_recv_primitive",
            "_is_transport_event",
            "_read_pdu_data",
            "artim_timer",
            "event_queue",
            "to_provider_queue",
            "to_user_queue",
            "state_machine",
            "socket",
            "assoc",
            label="DULServiceProvider",
        )
        assert dul._kill_thread is False, broken("DULServiceProvider._kill_thread (a bool)")
        assert isinstance(dul._run_loop_delay, float), broken("DULServiceProvider._run_loop_delay")
        for name in ("event_queue", "to_provider_queue", "to_user_queue", "_recv_pdu"):
            assert isinstance(getattr(dul, name), queue.Queue), broken(f"DUL.{name} (a Queue)")
        assert dul.state_machine.current_state == "Sta1", broken("state_machine.current_state")
        require(dul._idle_timer, "start", "restart", label="DUL._idle_timer")
        require(dul.artim_timer, "expired", label="DUL.artim_timer")

    def test_signatures(self) -> None:
        assert params(DULServiceProvider._decode_pdu) == ["self", "bytestream"], broken(
            "DULServiceProvider._decode_pdu(bytestream)", "changed the signature of"
        )
        assert params(DULServiceProvider.send_pdu) == ["self", "primitive"], broken(
            "DULServiceProvider.send_pdu(primitive)", "changed the signature of"
        )
        assert "wait" in params(DULServiceProvider.receive_pdu), broken(
            "DULServiceProvider.receive_pdu(wait=...)", "changed the signature of"
        )
        assert params(DULServiceProvider._is_transport_event) == ["self"], broken(
            "DULServiceProvider._is_transport_event()", "changed the signature of"
        )

    def test_transport_event_reads_through_read_pdu_data(self) -> None:
        source = inspect.getsource(DULServiceProvider._is_transport_event)
        assert "self._read_pdu_data()" in source, broken(
            "DULServiceProvider._is_transport_event -> _read_pdu_data", "changed"
        )

    def test_decode_pdu_returns_pdu_and_event(self, acceptor: Association) -> None:
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x00
        pdu, event = acceptor.dul._decode_pdu(bytearray(abort.encode()))
        assert isinstance(pdu, A_ABORT_RQ) and event == "Evt16", broken(
            "DULServiceProvider._decode_pdu -> (pdu, event)", "changed the result of"
        )

    def test_kill_thread_is_a_plain_attribute(self) -> None:
        """NodeDUL turns it into a property so that kill() wakes its select()."""
        assert not isinstance(
            inspect.getattr_static(DULServiceProvider, "_kill_thread", None), property
        ), broken("DULServiceProvider._kill_thread", "made a property of")


class TestAssociation:
    def test_init_signature(self) -> None:
        assert params(Association.__init__) == ["self", "ae", "mode"], broken(
            "Association.__init__(ae, mode)", "changed the signature of"
        )

    def test_names(self, acceptor: Association) -> None:
        require(
            acceptor,
            "_dul_ready",
            "_reactor_checkpoint",
            "_is_paused",
            "_kill",
            "_serve_request",
            "_run_reactor",
            "_server",
            "network_timeout_response",
            "get_handlers",
            "kill",
            "set_socket",
            label="Association",
        )
        require(
            acceptor.acse,
            "is_release_requested",
            "send_release",
            "is_aborted",
            "send_reject",
            label="ACSE",
        )
        require(acceptor.dul, "idle_timer_expired", label="DULServiceProvider")
        assert params(Association._serve_request) == ["self", "msg", "context_id"], broken(
            "Association._serve_request(msg, context_id)", "changed the signature of"
        )
        assert "is_response" in params(type(acceptor.acse).send_release), broken(
            "ACSE.send_release(is_response=...)", "changed the signature of"
        )

    def test_dul_and_dimse_are_replaceable(self, acceptor: Association) -> None:
        assert isinstance(acceptor.dul, DULServiceProvider), broken("Association.dul")
        assert isinstance(acceptor.dimse, DIMSEServiceProvider), broken("Association.dimse")
        node = tuned.NodeAssociation(AE(), "acceptor")
        assert isinstance(node.dul, tuned.NodeDUL) and isinstance(node.dimse, tuned.NodeDIMSE)
        assert node.dul.assoc is node and node.dimse.assoc is node, broken(
            "DULServiceProvider(assoc) / DIMSEServiceProvider(assoc)", "changed"
        )


class TestDIMSE:
    def test_names(self, acceptor: Association) -> None:
        dimse = acceptor.dimse
        require(
            dimse,
            "message",
            "msg_queue",
            "maximum_pdu_size",
            "dul",
            "assoc",
            label="DIMSEServiceProvider",
        )
        assert dimse.message is None, broken("DIMSEServiceProvider.message (None between messages)")
        assert isinstance(dimse.msg_queue, queue.Queue), broken("DIMSEServiceProvider.msg_queue")
        assert params(DIMSEServiceProvider.receive_primitive) == ["self", "primitive"], broken(
            "DIMSEServiceProvider.receive_primitive(primitive)", "changed the signature of"
        )
        assert params(DIMSEServiceProvider.send_msg) == ["self", "primitive", "context_id"], broken(
            "DIMSEServiceProvider.send_msg(primitive, context_id)", "changed the signature of"
        )
        assert isinstance(DIMSEMessage().encoded_command_set, io.BytesIO), broken(
            "DIMSEMessage.encoded_command_set (a BytesIO)"
        )

    def test_names_the_inline_store_reads(self, acceptor: Association) -> None:
        """``NodeDIMSE._serve_inline`` checks what ``_serve_request`` checks, by these names."""
        require(acceptor, "_sent_release", "_accepted_cx", "is_established", label="Association")
        assert isinstance(acceptor._accepted_cx, dict), broken("Association._accepted_cx (a dict)")
        assert isinstance(acceptor.acceptor.accepted_common_extended, dict), broken(
            "ServiceUser.accepted_common_extended (a dict)"
        )
        handlers = acceptor.get_handlers(evt.EVT_C_STORE)
        assert isinstance(handlers, tuple) and len(handlers) == 2, broken(
            "Association.get_handlers(EVT_C_STORE) (a (callable, args) pair)", "changed"
        )

    def test_c_store_private_attributes(self) -> None:
        req = C_STORE()
        for name in ("_context_id", "_dataset_path", "_dataset_file"):
            assert hasattr(req, name) and getattr(req, name) is None, broken(f"C_STORE.{name}")

    def test_p_data_pdv_list(self) -> None:
        primitive = P_DATA()
        assert primitive.presentation_data_value_list == [], broken(
            "P_DATA.presentation_data_value_list"
        )
        primitive.presentation_data_value_list = tuned._pdv_list([(1, memoryview(b"\x03ab"))])
        assert primitive.presentation_data_value_list == [[1, b"\x03ab"]], broken(
            "P_DATA.presentation_data_value_list (a list of [context_id, bytes] lists)", "changed"
        )

    def test_event_dataset_path_is_none_without_chunked_receive(self) -> None:
        """handler.py reads ``event.dataset_path``: None unless pynetdicom spooled the data set."""
        req = C_STORE()
        req.DataSet = io.BytesIO(b"\x08\x00\x18\x00")
        event = Event(None, evt.EVT_C_STORE, {"request": req})  # type: ignore[arg-type]
        assert event.dataset_path is None, broken("Event.dataset_path", "changed")
        assert event.encoded_dataset(include_meta=False) == b"\x08\x00\x18\x00", broken(
            "Event.encoded_dataset(include_meta=False)", "changed"
        )


class TestTransport:
    def test_socket(self) -> None:
        assert params(AssociationSocket.__init__)[:3] == ["self", "assoc", "client_socket"], broken(
            "AssociationSocket.__init__(assoc, client_socket)", "changed the signature of"
        )
        require(AssociationSocket, "send", "recv", label="AssociationSocket")
        assert "socket" in inspect.getsource(AssociationSocket.__init__), broken(
            "AssociationSocket.socket"
        )

    def test_request_handler(self) -> None:
        require(
            RequestHandler, "_create_association", "ae", "local", "remote", label="RequestHandler"
        )
        assert "self._create_association()" in inspect.getsource(RequestHandler.handle), broken(
            "RequestHandler.handle -> _create_association", "changed"
        )

    def test_server_and_ae(self) -> None:
        require(
            ThreadedAssociationServer, "ssl_context", "shutdown", label="ThreadedAssociationServer"
        )
        init = inspect.getsource(ThreadedAssociationServer.__init__)
        for name in ("self._handlers", "self.contexts", "self.ae_title"):
            assert name in init, broken(f"ThreadedAssociationServer.{name[5:]}")
        assert "request_handler" in params(ThreadedAssociationServer.__init__), broken(
            "ThreadedAssociationServer(request_handler=...)", "changed the signature of"
        )
        assert "ae._servers.remove" in inspect.getsource(ThreadedAssociationServer.shutdown), (
            broken("ThreadedAssociationServer.shutdown -> AE._servers", "changed")
        )
        assert isinstance(AE()._servers, list), broken("AE._servers (a list)")
        assert "server_class" in params(AE.make_server), broken(
            "AE.make_server(server_class=...)", "changed the signature of"
        )

    def test_events(self) -> None:
        assert isinstance(evt.EVT_PDU_RECV, evt.NotificationEvent), broken("evt.NotificationEvent")
        assert evt.EVT_C_STORE.is_intervention and not evt.EVT_PDU_RECV.is_intervention, broken(
            "evt.*.is_intervention"
        )

    def test_acse_timeout_delivers_none(self) -> None:
        """end_negotiation() puts None on the DUL queue: what receive_pdu gives on timeout."""
        source = inspect.getsource(DULServiceProvider.receive_pdu)
        assert "queue.Empty" in source and "return None" in source, broken(
            "DULServiceProvider.receive_pdu (None on timeout)", "changed"
        )


class TestUnrestrictedStorage:
    """``accept_unknown_sop_classes`` is pynetdicom's ``UNRESTRICTED_STORAGE_SERVICE``
    (:func:`tuned.set_unrestricted_storage`): the flag, the acceptor negotiation that reads it
    and the C-STORE dispatch that serves unknown classes as storage."""

    def test_flag_and_the_code_that_reads_it(self) -> None:
        assert isinstance(_config.UNRESTRICTED_STORAGE_SERVICE, bool), broken(
            "_config.UNRESTRICTED_STORAGE_SERVICE"
        )
        from pynetdicom import acse, presentation

        assert hasattr(presentation, "negotiate_unrestricted"), broken(
            "presentation.negotiate_unrestricted"
        )
        assert "UNRESTRICTED_STORAGE_SERVICE" in inspect.getsource(acse.ACSE), broken(
            "ACSE negotiation", "no longer reads"
        )
        assert "UNRESTRICTED_STORAGE_SERVICE" in inspect.getsource(Association._serve_request), (
            broken("Association._serve_request", "no longer reads")
        )

    def test_setter_flips_the_flag(self) -> None:
        previous = _config.UNRESTRICTED_STORAGE_SERVICE
        try:
            tuned.set_unrestricted_storage(True)
            assert _config.UNRESTRICTED_STORAGE_SERVICE is True
            tuned.set_unrestricted_storage(False)
            assert _config.UNRESTRICTED_STORAGE_SERVICE is False
        finally:
            _config.UNRESTRICTED_STORAGE_SERVICE = previous


class TestLimitsAndDeadlines:
    """What the PDU length limits and read deadlines (issue 10) rely on in pynetdicom."""

    def test_connection_closed_ends_every_state_the_reader_drops_in(self) -> None:
        """NodeDUL._drop puts Evt17: these actions shut the socket down and reach Sta1."""
        for state, action in (("Sta2", "AA-5"), ("Sta3", "AA-4"), ("Sta6", "AA-4")):
            assert fsm.TRANSITION_TABLE[("Evt17", state)] == action, broken(f"fsm {state}+Evt17")
            assert fsm.ACTIONS[action][2] == "Sta1", broken(f"fsm.ACTIONS[{action!r}]")
        assert fsm.TRANSITION_TABLE[("Evt17", "Sta13")] == "AR-5", broken("fsm Sta13+Evt17")
        for func in (fsm.AA_4, fsm.AA_5, fsm.AR_5):
            assert "_shutdown_socket()" in inspect.getsource(func), broken(
                f"fsm.{func.__name__} (shuts the socket down)", "changed"
            )
        assert fsm.TRANSITION_TABLE[("Evt18", "Sta2")] == "AA-2", broken("fsm Sta2+Evt18 (ARTIM)")

    def test_invalid_event_raises_invalid_event_error(self, acceptor: Association) -> None:
        """NodeDUL catches it for a local primitive that lost a race with an abort (Sta13)."""
        assert ("Evt7", "Sta13") not in fsm.TRANSITION_TABLE, broken("fsm Sta13+Evt7", "defined")
        acceptor.dul.state_machine.current_state = "Sta13"
        with pytest.raises(fsm.InvalidEventError, match="Invalid event 'Evt7'"):
            acceptor.dul.state_machine.do_action("Evt7")

    def test_local_events_come_from_the_provider_queue(self) -> None:
        source = inspect.getsource(DULServiceProvider._process_recv_primitive)
        assert "self.to_provider_queue.queue[0]" in source, broken(
            "DULServiceProvider._process_recv_primitive (peeks the provider queue)", "changed"
        )
        for event in tuned._LOCAL_EVENTS - {"Evt2"}:
            assert f'"{event}"' in source, broken(f"_process_recv_primitive -> {event}", "changed")

    def test_timeout_setters_reach_the_dul_timers(self) -> None:
        """NodeAssociation re-applies them after replacing the DUL."""
        ae = AE()
        ae.acse_timeout, ae.network_timeout = 7, 9
        node = tuned.NodeAssociation(ae, "acceptor")
        assert node.dul.artim_timer.timeout == 7, broken("Association.acse_timeout -> ARTIM")
        assert node.dul._idle_timer.timeout == 9, broken("Association.network_timeout -> idle")

    def test_names_the_reader_and_the_limits_use(self, acceptor: Association) -> None:
        require(acceptor.acceptor, "maximum_length", label="ServiceUser")
        require(acceptor.requestor, "address_info", label="ServiceUser")
        assert isinstance(
            inspect.getattr_static(type(acceptor.requestor), "address", None), property
        ), broken("ServiceUser.address (a property)")
        require(acceptor, "acse_timeout", "dimse_timeout", "network_timeout", label="Association")
        assert "AcceptorThread" in inspect.getsource(
            ThreadedAssociationServer.active_associations.fget  # type: ignore[attr-defined]
        ), broken("AssociationServer.active_associations (AcceptorThread names)", "changed")
        assert 'name = f"AcceptorThread' in inspect.getsource(RequestHandler._create_association), (
            broken("RequestHandler._create_association (thread name)", "changed")
        )
