"""Manifest schema: valid manifests load, every mistake is named with its file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicom_node.modelstore.manifest import (
    ManifestError,
    contract_differences,
    load_manifest,
    parse_manifest,
)
from tests.helpers.onnx_models import manifest_dict, write_model_version, write_yaml


def _write(tmp_path: Path, data: Any, folder: str = "1") -> Path:
    path = tmp_path / folder / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(path, data)
    return path


class TestLoadManifest:
    def test_valid_manifest_loads_with_contract(self, tmp_path: Path) -> None:
        folder = write_model_version(tmp_path, version="1")
        manifest = load_manifest(folder)
        assert manifest.name == "thyroid-seg"
        assert manifest.version == "1"
        assert manifest.input.size == (64, 64)
        assert manifest.input.modalities == ["NM"]
        assert [s.key for s in manifest.segments] == ["thyroid", "nodule"]
        assert manifest.segment("nodule").type.value == "27925004"
        assert manifest.max_channel == 1
        keys = [c[0] for c in manifest.contract()]
        assert keys == ["nodule", "thyroid"]

    def test_integer_version_is_text(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["version"] = 1
        assert load_manifest(_write(tmp_path, data)).version == "1"

    def test_unknown_field_named_with_file(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["output"]["treshold"] = 0.4
        path = _write(tmp_path, data)
        with pytest.raises(ManifestError, match=r"manifest\.yaml: output\.treshold: unknown field"):
            load_manifest(path)

    def test_missing_field(self, tmp_path: Path) -> None:
        data = manifest_dict()
        del data["sha256"]
        with pytest.raises(ManifestError, match=r"sha256: required field is missing"):
            load_manifest(_write(tmp_path, data))

    def test_bad_threshold_shows_value(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["output"]["threshold"] = 1.5
        with pytest.raises(ManifestError, match=r"output\.threshold: .*less than 1.*1\.5"):
            load_manifest(_write(tmp_path, data))

    def test_bad_segment_key_has_index(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["segments"][1]["key"] = "Cold Nodule"
        with pytest.raises(ManifestError, match=r"segments\.1\.key: key must be lower-case"):
            load_manifest(_write(tmp_path, data))

    def test_duplicate_segment_key(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["segments"][1]["key"] = "thyroid"
        with pytest.raises(ManifestError, match=r"duplicate key\(s\) \['thyroid'\]"):
            load_manifest(_write(tmp_path, data))

    def test_bad_sha(self, tmp_path: Path) -> None:
        data = manifest_dict(sha256="abc")
        with pytest.raises(ManifestError, match=r"sha256: sha256 must be 64 hex digits"):
            load_manifest(_write(tmp_path, data))

    def test_normalization_parameter_of_other_method(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["input"]["normalization"] = {"method": "minmax", "upper": 99}
        with pytest.raises(ManifestError, match=r"input\.normalization: 'upper' is not a param"):
            load_manifest(_write(tmp_path, data))

    def test_softmax_channel_zero_is_background(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["output"]["activation"] = "softmax"
        with pytest.raises(ManifestError, match=r"channel 0 is the background"):
            load_manifest(_write(tmp_path, data))

    def test_folder_must_match_version(self, tmp_path: Path) -> None:
        path = _write(tmp_path, manifest_dict(version="2"), folder="1")
        with pytest.raises(ManifestError, match=r"version: must equal the version folder name '1'"):
            load_manifest(path, check_folder=True)
        assert load_manifest(path).version == "2"

    def test_model_file_must_stay_inside(self, tmp_path: Path) -> None:
        data = manifest_dict()
        data["model_file"] = "../other/model.onnx"
        with pytest.raises(ManifestError, match=r"model_file: must be a path inside"):
            load_manifest(_write(tmp_path, data))

    def test_not_yaml_and_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "1" / "manifest.yaml"
        path.parent.mkdir()
        path.write_text("name: [unclosed\n")
        with pytest.raises(ManifestError, match=r"manifest\.yaml: not valid YAML"):
            load_manifest(path)
        with pytest.raises(ManifestError, match=r"no manifest \(expected manifest\.yaml"):
            load_manifest(tmp_path / "nothing")

    def test_not_a_mapping(self) -> None:
        with pytest.raises(ManifestError, match=r"x\.yaml: must be a mapping of fields, got list"):
            parse_manifest([1, 2], "x.yaml")


class TestContract:
    def test_differences_are_named(self) -> None:
        old = parse_manifest(manifest_dict())
        data = manifest_dict()
        data["segments"][1]["label"] = "Nodule"
        data["segments"][0]["type"]["value"] = "12345"
        new = parse_manifest(data)
        diffs = contract_differences(old, new)
        assert "segment 'nodule' label: 'Cold nodule' -> 'Nodule'" in diffs
        assert "segment 'thyroid' type: SCT 69748006 -> SCT 12345" in diffs
        assert contract_differences(old, parse_manifest(manifest_dict(version="2"))) == []

    def test_color_and_description_are_not_contract(self) -> None:
        data = manifest_dict()
        data["segments"][0]["color"] = [1, 2, 3]
        data["description"] = "another"
        assert parse_manifest(data).contract() == parse_manifest(manifest_dict()).contract()
