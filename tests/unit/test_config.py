from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, load_settings, parse_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml"


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _minimal(tmp_path: Path) -> dict:
    return {
        "node": {"storage_dir": str(tmp_path / "s")},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["m"], "send_to": ["pacs"]}],
    }


def test_example_config_is_valid_and_complete() -> None:
    s = load_settings(EXAMPLE, environ={})
    assert s.node.ae_title == "AI-NODE" and s.node.port == 11112
    assert s.assembly.study_quiet_seconds == 30
    assert s.queue.broker_url == "" and s.embedded_broker
    assert s.destinations[0].type == "dimse" and s.rules[0].send_to == ["pacs"]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["node"]["prot"] = 1
    with pytest.raises(ConfigError, match=r"node\.prot"):
        load_settings(_write(tmp_path, data), environ={})


def test_bad_destination_reference(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["rules"][0]["send_to"] = ["nowhere"]
    with pytest.raises(ConfigError, match="nowhere"):
        load_settings(_write(tmp_path, data), environ={})


def test_unknown_match_attribute_and_bad_regex(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["rules"][0]["match"] = {"PatientName": "x"}
    with pytest.raises(ConfigError, match="PatientName"):
        load_settings(_write(tmp_path, data), environ={})
    data["rules"][0]["match"] = {"SeriesDescription": {"regex": "("}}
    with pytest.raises(ConfigError, match="regular expression"):
        load_settings(_write(tmp_path, data), environ={})


def test_env_overrides_secret(tmp_path: Path) -> None:
    env = {"DICOM_NODE__QUEUE__BROKER_URL": "redis://:pw@127.0.0.1:6379/0", "DICOM_NODE__NODE__PORT": "2000"}
    s = load_settings(_write(tmp_path, _minimal(tmp_path)), environ=env)
    assert s.queue.broker_url.startswith("redis://") and not s.embedded_broker
    assert s.node.port == 2000


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, _minimal(tmp_path)), environ={})
    with pytest.raises(Exception, match="frozen"):
        s.node.port = 1  # type: ignore[misc]


def test_relative_storage_dir_is_relative_to_config(tmp_path: Path) -> None:
    data = _minimal(tmp_path)
    data["node"]["storage_dir"] = "spool"
    s = load_settings(_write(tmp_path, data), environ={})
    assert s.node.storage_dir == (tmp_path / "spool").resolve()


def test_check_config_refuses_options_a_model_cannot_honour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")},
                                   "models": {"ct-hu-segmentation": {"path": str(tmp_path / "weights.pt")}}}))
    assert main(["check-config", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "models.ct-hu-segmentation" in err and "path" in err
    cfg.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")},
                                   "queue": {"torch_threads": 2},
                                   "models": {"dl-ct-segmentation": {"device": "cpu", "batch_size": 2}}}))
    assert main(["check-config", "-c", str(cfg)]) == 0


def test_check_config_refuses_unreadable_dicomweb_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    token = tmp_path / "token"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")}, "destinations": [
        {"name": "web", "type": "dicomweb", "url": "https://pacs/dicom-web", "token_file": str(token)}]}))
    assert main(["check-config", "-c", str(cfg)]) == 2
    assert f"destinations[web].token_file: cannot read {token}" in capsys.readouterr().err
    token.write_text("t")
    assert main(["check-config", "-c", str(cfg)]) == 2  # readable by others: refused
    assert f"destinations[web].token_file: {token} is readable by group or others" in capsys.readouterr().err
    token.chmod(0o600)
    assert main(["check-config", "-c", str(cfg)]) == 0


def test_commented_notifications_example_is_valid() -> None:
    """The commented ``notifications:`` block of the example configuration parses once uncommented."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index(next(x for x in lines if x.startswith("# notifications:")))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("#")), len(lines))
    block = yaml.safe_load("\n".join(x[2:] for x in lines[start:end]))
    s = parse_settings({**yaml.safe_load(EXAMPLE.read_text()), **block})
    assert [t.name for t in s.notifications.targets] == ["ops-webhook", "worklist", "pacs-admins"]
    assert s.notifications.smtp is not None and s.notifications.smtp.security == "starttls"
