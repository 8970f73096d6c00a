"""Reading a node's /metrics the way Prometheus does, so tests can assert on deltas.

Counters live in one registry per process; several nodes in one test process add to the same
series, so tests compare a value before and after what they do.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> str:
    """The text of ``GET /metrics`` on a node's HTTP port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def value(text: str, sample: str, **labels: str) -> float:
    """The value of ``sample`` (e.g. ``dicom_node_export_failure_total``) with exactly ``labels``;
    0.0 when the series does not exist yet.

    Every served sample carries the process's ``node`` label; it is compared only when
    ``labels`` names it."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            got = s.labels if "node" in labels else _without_node(s.labels)
            if s.name == sample and got == labels:
                return float(s.value)
    return 0.0


def _without_node(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k != "node"}


def sample(port: int, sample_name: str, **labels: str) -> float:
    """Scrape and return one value."""
    return value(scrape(port), sample_name, **labels)
