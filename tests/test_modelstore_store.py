"""Model store: resolve, add (atomic, refusing precisely), aliases, history, rollback, canary."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from dicom_node.modelstore.aliases import canary_bucket, in_canary, read_history
from dicom_node.modelstore.store import ModelStore, ModelStoreError
from tests.helpers.onnx_models import (
    DEFAULT_SEGMENTS,
    make_store,
    write_model_version,
    write_yaml,
)

NAME = "thyroid-seg"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (what 'untouched' means)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(root)) + "/": "" for p in root.rglob("*") if p.is_dir()}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(make_store(tmp_path / "models", versions=["1"], production="1"))


class TestResolveRefs:
    def test_malformed_reference_is_a_store_error(self, store: ModelStore) -> None:
        with pytest.raises(ModelStoreError, match=r"model must be '<model>@<alias>'.*got 'a@b@c'"):
            store.resolve("a@b@c")

    def test_bare_name_means_production(self, store: ModelStore) -> None:
        assert store.resolve("thyroid-seg").alias == "production"


class TestResolve:
    def test_alias_and_version(self, store: ModelStore) -> None:
        resolved = store.resolve("thyroid-seg@production")
        assert (resolved.name, resolved.version, resolved.alias) == (NAME, "1", "production")
        assert resolved.sha256 == resolved.manifest.sha256
        assert resolved.model_file.is_file()
        pinned = store.resolve("thyroid-seg:1")
        assert pinned.alias is None and pinned.version == "1"
        store.verify(resolved)

    def test_unknown_model_alias_version(self, store: ModelStore) -> None:
        with pytest.raises(
            ModelStoreError, match=r"no model 'lung' in .*models: \['thyroid-seg'\]"
        ):
            store.resolve("lung@production")
        with pytest.raises(ModelStoreError, match=r"alias 'candidate' is not set for thyroid-seg"):
            store.resolve("thyroid-seg@candidate")
        with pytest.raises(ModelStoreError, match=r"thyroid-seg:9: no such version .*\['1'\]"):
            store.resolve("thyroid-seg:9")

    def test_model_exists(self, store: ModelStore) -> None:
        assert store.model_exists("thyroid-seg@production") == (True, "")
        ok, reason = store.model_exists("thyroid-seg@shadow")
        assert not ok and "alias 'shadow' is not set" in reason

    def test_verify_detects_tampering(self, store: ModelStore) -> None:
        resolved = store.resolve("thyroid-seg:1")
        with open(resolved.model_file, "ab") as handle:
            handle.write(b"\0")
        with pytest.raises(
            ModelStoreError,
            match=r"thyroid-seg:1: sha256 of model.onnx is [0-9a-f]{64}, manifest says",
        ):
            store.verify(resolved)

    def test_versions_sorted_naturally(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["10", "2", "1"], production="2"))
        assert store.versions(NAME) == ["1", "2", "10"]
        assert store.list_models() == [NAME]


class TestAdd:
    def test_add_copies_and_records(self, store: ModelStore, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "incoming", version="2")
        resolved = store.add(source)
        assert resolved.ref == "thyroid-seg:2"
        assert store.versions(NAME) == ["1", "2"]
        assert (store.root / NAME / "2" / "model.onnx").read_bytes() == (
            source / "model.onnx"
        ).read_bytes()
        assert store.aliases(NAME) == {"production": "1"}  # add never moves an alias
        assert read_history(store.root / NAME)[-1]["reason"] == "add"
        assert not [p for p in (store.root / NAME).iterdir() if p.name.startswith(".add-")]

    def test_add_first_version_of_new_model(self, tmp_path: Path) -> None:
        store = ModelStore(tmp_path / "empty")
        source = write_model_version(tmp_path / "in", name="lung-seg", version="a1")
        assert store.add(source).ref == "lung-seg:a1"
        assert store.list_models() == ["lung-seg"]

    def test_source_folder_name_is_free(self, store: ModelStore, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "incoming", version="2")
        renamed = source.rename(tmp_path / "my-export")
        assert store.add(renamed).version == "2"

    def _refused(self, store: ModelStore, source: Path, match: str, **kwargs: bool) -> None:
        before = snapshot(store.root)
        with pytest.raises(ModelStoreError, match=match):
            store.add(source, **kwargs)
        assert snapshot(store.root) == before

    def test_tampered_weights(self, store: ModelStore, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "in", version="2")
        with open(source / "model.onnx", "ab") as handle:
            handle.write(b"x")
        self._refused(
            store,
            source,
            r"refused thyroid-seg:2: sha256 of .*model\.onnx is [0-9a-f]{64}, "
            r"manifest says [0-9a-f]{64}",
        )

    def test_existing_version(self, store: ModelStore, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "in", version="1")
        self._refused(store, source, r"refused thyroid-seg:1: version '1' already exists")

    def test_contract_change(self, store: ModelStore, tmp_path: Path) -> None:
        segments = [dict(s) for s in DEFAULT_SEGMENTS]
        segments[1] = dict(segments[1], label="Hot nodule")
        source = write_model_version(tmp_path / "in", version="2", segments=segments)
        self._refused(
            store,
            source,
            r"refused thyroid-seg:2: output contract differs from production thyroid-seg:1: "
            r"segment 'nodule' label: 'Cold nodule' -> 'Hot nodule' \(use --allow-contract-change",
        )
        assert store.add(source, allow_contract_change=True).version == "2"

    def test_invalid_manifest(self, store: ModelStore, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "in", version="2")
        text = (source / "manifest.yaml").read_text().replace("threshold: 0.5", "threshold: 2")
        (source / "manifest.yaml").write_text(text)
        self._refused(
            store, source, r"refused: invalid manifest: .*manifest\.yaml: output\.threshold"
        )

    def test_missing_model_file(self, store: ModelStore, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "in", version="2")
        (source / "model.onnx").unlink()
        self._refused(store, source, r"refused thyroid-seg:2: model_file .* does not exist")

    def test_crash_leftovers_are_cleaned_by_next_add(
        self, store: ModelStore, tmp_path: Path
    ) -> None:
        stale = store.root / NAME / ".add-2-deadbeef"
        stale.mkdir()
        (stale / "model.onnx").write_bytes(b"half a copy")
        assert store.versions(NAME) == ["1"]  # hidden folders are never versions
        store.add(write_model_version(tmp_path / "in", version="3"))
        assert not stale.exists()

    def test_refused_new_model_leaves_no_folder(self, tmp_path: Path) -> None:
        root = tmp_path / "store"
        root.mkdir()
        source = write_model_version(tmp_path / "in", name="other", version="1")
        (source / "model.onnx").write_bytes(b"changed")
        with pytest.raises(ModelStoreError, match=r"refused other:1: sha256"):
            ModelStore(root).add(source)
        assert list(root.iterdir()) == []


class TestAliases:
    def test_promote_rollback_history(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2", "3"], production="1"))
        store.promote(NAME, "2", gate_result={"passed": True})
        store.promote(NAME, "3")
        assert store.aliases(NAME)["production"] == "3"
        assert store.rollback(NAME)["to"] == "2"
        assert store.rollback(NAME)["to"] == "1"
        with pytest.raises(ModelStoreError, match=r"thyroid-seg: no previous production version"):
            store.rollback(NAME)
        history = store.history(NAME)
        assert [(h["reason"], h["from"], h["to"]) for h in history] == [
            ("promote", "1", "2"),
            ("promote", "2", "3"),
            ("rollback", "3", "2"),
            ("rollback", "2", "1"),
        ]
        assert history[0]["gate"] == {"passed": True}
        assert all(h["time"].endswith("Z") for h in history)

    def test_promote_after_rollback(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2", "3"], production="1"))
        store.promote(NAME, "2")
        store.rollback(NAME)
        store.promote(NAME, "3")
        assert store.rollback(NAME)["to"] == "1"

    def test_unknown_version_or_alias_refused(self, store: ModelStore) -> None:
        before = snapshot(store.root)
        with pytest.raises(ModelStoreError, match=r"thyroid-seg:7: no such version"):
            store.promote(NAME, "7")
        with pytest.raises(ModelStoreError, match=r"alias must be lower-case .* got 'Prod uction'"):
            store.set_alias(NAME, "Prod uction", "1")
        assert snapshot(store.root) == before

    def test_shadow_canary_and_promotion_ends_them(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2"], production="1"))
        store.shadow(NAME, "2")
        store.canary(NAME, "2", 10)
        assert store.aliases(NAME) == {
            "production": "1",
            "shadow": "2",
            "canary": {"version": "2", "percent": 10},
        }
        store.promote(NAME, "2")
        assert store.aliases(NAME) == {"production": "2"}
        store.shadow(NAME, "1")
        store.shadow(NAME, None)
        assert "shadow" not in store.aliases(NAME)
        with pytest.raises(
            ModelStoreError, match=r"canary percent must be an integer 0-100, got 150"
        ):
            store.canary(NAME, "1", 150)

    def test_alias_file_is_replaced_atomically(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2"], production="1"))
        reader = ModelStore(store.root)
        stop = threading.Event()
        seen: list[str] = []
        errors: list[Exception] = []

        def read() -> None:
            while not stop.is_set():
                try:
                    seen.append(reader.aliases(NAME)["production"])
                except Exception as exc:  # a half-written file would show here
                    errors.append(exc)

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for i in range(100):
                store.promote(NAME, "2" if i % 2 == 0 else "1")
        finally:
            stop.set()
            thread.join()
        assert errors == []
        assert set(seen) <= {"1", "2"} and seen
        leftovers = [p.name for p in (store.root / NAME).iterdir() if p.name.endswith(".tmp")]
        assert leftovers == []

    def test_invalid_alias_file_is_named(self, store: ModelStore) -> None:
        write_yaml(
            store.root / NAME / "aliases.yaml", {"production": "1", "canary": {"version": "1"}}
        )
        with pytest.raises(ModelStoreError, match=r"aliases\.yaml: canary must be \{version"):
            store.resolve("thyroid-seg@production")

    def test_torn_history_line_is_skipped(self, store: ModelStore) -> None:
        store.shadow(NAME, "1")
        with open(store.root / NAME / "history.yaml", "a") as handle:
            handle.write('- {"time": "2026-11')
        assert [h["reason"] for h in store.history(NAME)] == ["shadow"]


class TestCanary:
    def test_share_within_tolerance_and_stable(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2"], production="1"))
        store.canary(NAME, "2", 10)
        uids = [f"1.2.826.0.1.3680043.8.498.{i}.{i * 7919 % 1000}" for i in range(2000)]
        first = {u: store.resolve("thyroid-seg@production", u) for u in uids}
        share = sum(r.version == "2" for r in first.values()) / len(uids)
        assert 0.08 <= share <= 0.12
        assert all(r.alias == "canary" for r in first.values() if r.version == "2")
        again = ModelStore(store.root)  # another process would decide the same way
        assert all(
            again.resolve("thyroid-seg@production", u).version == r.version
            for u, r in first.items()
        )

    def test_no_uid_and_bounds(self, store: ModelStore) -> None:
        assert not in_canary(None, 100)
        assert not in_canary("1.2.3", 0)
        assert in_canary("1.2.3", 100)
        assert canary_bucket("1.2.3") == canary_bucket(" 1.2.3 ")
        store.canary(NAME, "1", 100)
        assert store.resolve("thyroid-seg@production").alias == "production"

    def test_pinned_version_ignores_canary(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2"], production="1"))
        store.canary(NAME, "2", 100)
        assert store.resolve("thyroid-seg:1", "1.2.3").version == "1"
        assert store.resolve("thyroid-seg@production", "1.2.3").version == "2"


def test_store_files_are_durable_names(store: ModelStore) -> None:
    """Nothing but the documented files lives in a model folder after normal operations."""
    store.shadow(NAME, "1")
    names = sorted(os.listdir(store.root / NAME))
    assert names == [".lock", "1", "aliases.yaml", "history.yaml"]


def test_version_folder_must_match_manifest(tmp_path: Path) -> None:
    root = make_store(tmp_path / "m", versions=["1"])
    (root / NAME / "1").rename(root / NAME / "7")
    with pytest.raises(ModelStoreError, match=r"version: must equal the version folder name '7'"):
        ModelStore(root).resolve("thyroid-seg:7")
