"""Config validation names the bad key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmshield.cli import example_config, main
from mmshield.config import config_from_dict, load_config
from mmshield.errors import ConfigError


def test_example_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(example_config())
    cfg = load_config(path)
    assert cfg.dataset.name == "av-digits" and cfg.partition.clients == 20
    assert cfg.partition.missing_modality == {"image": 0.3, "audio": 0.3, "text": 0.3}


def test_unknown_key_is_named_with_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"training": {"roundz": 3}})
    msg = str(err.value)
    assert "training.roundz" in msg and "unknown key" in msg and "rounds" in msg


def test_bad_value_names_key_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"partition": {"scheme": "random"}})
    msg = str(err.value)
    assert "partition.scheme" in msg and "'dirichlet'" in msg and "'random'" in msg
    with pytest.raises(ConfigError, match=r"training\.lr"):
        config_from_dict({"training": {"lr": -1}})


def test_manifest_needs_path() -> None:
    with pytest.raises(ConfigError, match=r"dataset\.path"):
        config_from_dict({"dataset": {"name": "manifest"}})


def test_cli_reports_bad_config_without_traceback(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  rounds: 3\n  lr: fast\n")
    assert main(["run", str(path), "--store", str(tmp_path / "s.db")]) == 2
    out = capsys.readouterr().out
    assert "training.lr" in out and str(path) in out and "Traceback" not in out


def test_cli_init_writes_config(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path)]) == 0
    assert load_config(tmp_path / "mmshield.yaml").name == "av-digits-demo"
    assert main(["init", str(tmp_path)]) == 1  # refuses to overwrite
