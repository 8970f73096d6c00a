"""``dicom-node demo``: the whole loop on one machine, with no PACS.

Starts a node on free ports with a throw-away storage, a receiving AE in-process standing in for the
PACS, pushes a synthetic thyroid study (from :mod:`dicom_node.demo.phantoms`), waits for the SEG and
scores it against the phantom's truth.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import NuclearMedicineImageStorage, SegmentationStorage
from pynetdicom import AE, evt

from dicom_node.config import Destination, NodeConfig
from dicom_node.demo.phantoms_classic import make_case  # what thyroid-seg:1 was trained on
from dicom_node.modelstore.scoring import dice

LOGGER = logging.getLogger(__name__)

DEMO_AE = "DEMOPACS"
DEMO_RULE = """\
rules:
  - name: demo-thyroid
    priority: 100
    when:
      Modality: NM
    complete: {{instances: 1}}
    model: {model}
    send_to: [demo]
    stop: true
"""


@dataclass(frozen=True)
class DemoReport:
    """What the demo prints."""

    seg_path: Path
    model: str
    version: str
    rule: str
    seconds: float
    dice: dict[str, float]


class _Receiver:
    """A minimal PACS: accepts SEG storage and keeps each dataset on disk."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.received: list[Path] = []
        self.arrived = threading.Event()
        ae = AE(ae_title=DEMO_AE)
        ae.add_supported_context(SegmentationStorage)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        if server is None:  # only a blocking start_server returns None
            raise RuntimeError("the demo receiver did not start: start_server returned None")
        self._server = server
        # pynetdicom sets server_address from socket.getsockname() after binding port 0
        self.port = int(server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.received.append(path)
        self.arrived.set()
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def _push(ds: pydicom.Dataset, port: int, called: str) -> None:
    ae = AE(ae_title="DEMOSCU")
    ae.add_requested_context(NuclearMedicineImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"the demo node refused the association on port {port}")
    status = assoc.send_c_store(ds)
    assoc.release()
    if not status or status.Status != 0x0000:
        raise RuntimeError(f"C-STORE to the demo node failed: {status or 'no response'}")


def _score(seg_path: Path, source_uid: str, truth: dict[str, np.ndarray]) -> dict[str, float]:
    seg = hd.seg.segread(seg_path)
    out: dict[str, float] = {}
    for desc in seg.SegmentSequence:
        key = next((k for k in truth if k in str(desc.SegmentLabel).lower()), None)
        if key is None:
            key = next(iter(k for k in truth if k not in out), None)
        if key is None:
            continue
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source_uid],
            segment_numbers=[int(desc.SegmentNumber)],
            combine_segments=False,
        )
        out[key] = dice(np.asarray(pixels[0, ..., 0]).astype(bool), truth[key])
    return out


def run_demo(
    config: NodeConfig,
    *,
    size: int = 256,
    seed: int = 7,
    out: Path | None = None,
    model_ref: str = "thyroid-seg@production",
    timeout: float = 60.0,
) -> DemoReport:
    """Run the loop once and return where the SEG is and how it scored.

    Raises
    ------
    RuntimeError
        The shipped model is missing, the node does not answer, or no SEG arrives in time.
    """
    from dicom_node.node import Node

    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
    (root / "received").mkdir(parents=True, exist_ok=True)
    rules = config.rules
    if not any(rules.glob("*.yaml")):  # no rules of the site's own: route NM to the model
        rules = root / "rules"
        rules.mkdir(exist_ok=True)
        (rules / "demo.yaml").write_text(DEMO_RULE.format(model=model_ref))
    if not (config.models / model_ref.split("@")[0].split(":")[0]).is_dir():
        raise RuntimeError(f"model {model_ref} is not in the model store {config.models}")
    receiver = _Receiver(root / "received")
    stand_in = Destination(ae_title=DEMO_AE, host="127.0.0.1", port=receiver.port)
    # every destination a rule may name is the in-process stand-in for the PACS
    names = set(config.destinations) | {"demo"}
    demo_config = config.model_copy(
        update={
            "port": 0,
            "http_port": 0,
            "host": "127.0.0.1",
            "http_host": "127.0.0.1",
            "storage": root / "storage",
            "rules": rules,
            "allowed_callers": [],
            "destinations": {name: stand_in for name in names},
            "min_free_disk": 0,
            "tls": None,
        }
    )
    node = Node(demo_config)
    try:
        node.start()
        if not _wait_ready(node, 30.0):
            raise RuntimeError(f"the demo node is not ready: {node.readiness()}")
        case = make_case(seed, size)
        start = time.perf_counter()
        _push(case.dataset, node.dicom_port, demo_config.ae_title)
        if not receiver.arrived.wait(timeout):
            jobs = node.store.list_jobs(limit=1)
            reason = (
                (jobs[0].error or jobs[0].outcome or jobs[0].state.value)
                if jobs
                else "the study was not recorded"
            )
            raise RuntimeError(f"no SEG within {timeout:.0f} s (rules in {rules}): {reason}")
        seconds = time.perf_counter() - start
        node.wait_idle(10.0)
        job = node.store.list_jobs(["done"], limit=1)[0]
        seg_path = receiver.received[0]
        return DemoReport(
            seg_path=seg_path,
            model=job.model_name or "",  # a done job has all three
            version=job.model_version or "",
            rule=job.rule or "",
            seconds=seconds,
            dice=_score(seg_path, str(case.dataset.SOPInstanceUID), case.truth),
        )
    finally:
        node.stop()
        receiver.stop()


def _wait_ready(node: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(ok for ok, _ in node.readiness().values()):  # type: ignore[attr-defined]
            return True
        time.sleep(0.1)
    return False
