"""Hot reload: edits, additions and deletions are applied; invalid sets are rejected whole."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node import metrics
from dicom_node.routing import ActiveRules, RuleSet, RulesWatcher, evaluate, load_rules

RULE = """\
rules:
  - name: {name}
    when: {{Modality: {modality}}}
    model: thyroid-seg@production
    send_to: [pacs]
"""


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (a generous bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def failures() -> float:
    return metrics.REGISTRY.get_sample_value("dicom_node_rules_reload_failures_total") or 0.0


def info(version: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("dicom_node_rules_info", {"version": version})


def routed(active: ActiveRules, modality: str) -> list[str]:
    current = active.current
    assert current is not None
    return evaluate(current, {"Modality": modality}).rule_names


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "nm.yaml").write_text(RULE.format(name="nm", modality="NM"))
    return rules


@pytest.fixture
def watched(folder: Path) -> Iterator[tuple[ActiveRules, RulesWatcher]]:
    active = ActiveRules()
    watcher = RulesWatcher(
        folder,
        lambda: load_rules(folder, destinations={"pacs"}),
        on_change=active.set,
        on_error=active.set_error,
        interval=0.2,
    )
    watcher.start()
    try:
        yield active, watcher
    finally:
        watcher.stop()


class TestRulesWatcher:
    def test_initial_load(self, watched: tuple[ActiveRules, RulesWatcher]) -> None:
        active, _ = watched
        assert active.ready and active.error is None
        assert routed(active, "NM") == ["nm"]
        assert info(active.current.version) == 1.0  # type: ignore[union-attr]

    def test_good_edit_is_applied(
        self, folder: Path, watched: tuple[ActiveRules, RulesWatcher]
    ) -> None:
        active, _ = watched
        old = active.current.version  # type: ignore[union-attr]
        (folder / "nm.yaml").write_text(RULE.format(name="nm", modality="CT"))
        assert wait_for(lambda: routed(active, "CT") == ["nm"])
        assert routed(active, "NM") == []
        assert info(active.current.version) == 1.0  # type: ignore[union-attr]
        assert info(old) is None

    def test_bad_edit_is_rejected_and_old_set_stays(
        self, folder: Path, watched: tuple[ActiveRules, RulesWatcher]
    ) -> None:
        active, watcher = watched
        before = failures()
        good = active.current
        (folder / "nm.yaml").write_text(
            RULE.format(name="nm", modality="NM").replace("Modality", "Modaliti")
        )
        assert wait_for(lambda: active.error is not None)
        assert "nm.yaml:3: rule 'nm': unknown DICOM keyword 'Modaliti'" in active.error
        assert active.current is good and routed(active, "NM") == ["nm"]
        assert failures() == before + 1
        assert watcher.check_now() is None  # same bad content: not counted again
        assert failures() == before + 1
        (folder / "nm.yaml").write_text(RULE.format(name="nm2", modality="NM"))
        assert wait_for(lambda: active.error is None)
        assert routed(active, "NM") == ["nm2"]

    def test_added_and_deleted_files(
        self, folder: Path, watched: tuple[ActiveRules, RulesWatcher]
    ) -> None:
        active, _ = watched
        (folder / "ct.yaml").write_text(RULE.format(name="ct", modality="CT"))
        assert wait_for(lambda: routed(active, "CT") == ["ct"])
        (folder / "ct.yaml").unlink()
        assert wait_for(lambda: routed(active, "CT") == [])
        (folder / "nm.yaml").unlink()
        assert wait_for(lambda: len(active.current or ()) == 0)  # type: ignore[arg-type]

    def test_files_in_subfolders_are_ignored(
        self, folder: Path, watched: tuple[ActiveRules, RulesWatcher]
    ) -> None:
        active, watcher = watched
        (folder / "examples").mkdir()
        (folder / "examples" / "x.yaml").write_text("broken: [")
        assert watcher.check_now() is None
        assert active.error is None


class TestInitialFailure:
    def test_invalid_at_start_is_not_ready(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text("rules: [")
        active = ActiveRules()
        errors: list[int] = []

        def on_error(problems: list) -> None:
            errors.append(len(problems))
            active.set_error(problems)

        watcher = RulesWatcher(
            tmp_path, lambda: load_rules(tmp_path), active.set, on_error, interval=0.2
        )
        watcher.start()
        try:
            assert not active.ready and errors == [1]
            assert "YAML syntax error" in (active.error or "")
            (tmp_path / "a.yaml").write_text(RULE.format(name="a", modality="NM"))
            assert wait_for(lambda: active.ready)
        finally:
            watcher.stop()

    def test_unexpected_load_exception_is_a_rejection(self, tmp_path: Path) -> None:
        seen: list[str] = []

        def load() -> RuleSet:
            raise OSError("disk gone")

        watcher = RulesWatcher(
            tmp_path, load, lambda rs: None, lambda problems: seen.append(str(problems[0]))
        )
        assert watcher.check_now(initial=True) is False
        assert "cannot load: disk gone" in seen[0]

    def test_interval_must_be_positive(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="interval must be > 0 seconds"):
            RulesWatcher(
                tmp_path, lambda: load_rules(tmp_path), lambda rs: None, lambda p: None, interval=0
            )


def test_active_rules_swap_is_seen_by_readers(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(RULE.format(name="a", modality="NM"))
    first = load_rules(tmp_path)
    (tmp_path / "a.yaml").write_text(RULE.format(name="b", modality="NM"))
    second = load_rules(tmp_path)
    active = ActiveRules(first)
    stop = threading.Event()
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            seen.update(routed(active, "NM"))

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(200):
        active.set(second if active.current is first else first)
    stop.set()
    thread.join()
    assert seen <= {"a", "b"}
