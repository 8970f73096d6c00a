"""Configuration: defaults, file over defaults, environment over file, precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_config, parse_size


class TestLoadConfig:
    def test_embedded_defaults_match_design(self) -> None:
        config = load_config(environ={})
        assert (config.ae_title, config.port, config.http_port) == ("DICOMNODE", 11112, 9100)
        assert config.storage == (Path.cwd() / "var").resolve()
        assert config.destinations["pacs"].port == 4242
        assert config.allowed_callers == []

    def test_file_paths_are_relative_to_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("port: 104\nstorage: data\nmin_free_disk: 1GB\n")
        config = load_config(path, environ={})
        assert config.port == 104
        assert config.storage == tmp_path / "data"
        assert config.min_free_disk == 1_000_000_000

    def test_environment_overrides_file(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("port: 104\n")
        env = {
            "DICOM_NODE_PORT": "2000",
            "DICOM_NODE_DESTINATIONS": "{pacs2: {ae_title: X, host: h, port: 11}}",
            "DICOM_NODE_ALLOWED_CALLERS": "[ORTHANC, MODALITY@10.0.0.2]",
        }
        config = load_config(path, environ=env)
        assert config.port == 2000
        assert config.destinations["pacs2"].ae_title == "X"
        assert config.allowed_callers == ["ORTHANC", "MODALITY@10.0.0.2"]

    def test_unknown_key_is_named(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("prot: 104\n")
        with pytest.raises(ConfigError, match=r"node.yaml: prot: Extra inputs are not permitted"):
            load_config(path, environ={})

    def test_bad_value_is_named(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("destinations: {pacs: {ae_title: X, host: h, port: 700000}}\n")
        with pytest.raises(ConfigError, match=r"destinations.pacs.port"):
            load_config(path, environ={})

    def test_invalid_yaml_and_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("port: [1,\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(path, environ={})
        with pytest.raises(ConfigError, match="cannot read configuration"):
            load_config(tmp_path / "missing.yaml", environ={})


class TestParseSize:
    @pytest.mark.parametrize(
        ("text", "value"),
        [("5GB", 5_000_000_000), ("512MiB", 512 * 2**20), (1024, 1024), ("10", 10)],
    )
    def test_sizes(self, text: str | int, value: int) -> None:
        assert parse_size(text) == value

    def test_bad_size(self) -> None:
        with pytest.raises(ValueError, match="size must look like"):
            parse_size("five gigs")
