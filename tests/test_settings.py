"""Settings: file via FLOWCEPT_SETTINGS_PATH, env overrides, clear errors naming the key."""

from __future__ import annotations

import pytest

from flowcept import Flowcept, FlowceptTask
from flowcept.settings import KEYS, SettingsError, load_settings, render_yaml


def test_defaults_need_no_service():
    settings = load_settings(env={})
    assert settings.path is None or settings.path.endswith("settings.yaml")
    assert settings["project.dump_buffer.enabled"] is True
    assert settings["databases.mongodb.enabled"] is False
    assert settings["daemon.address"] is None


def test_every_key_has_a_documented_variable():
    names = [k.name for k in KEYS]
    assert len(names) == len(set(names))
    for key in KEYS:
        assert key.env_var == "FLOWCEPT_" + key.name.upper().replace(".", "_")
        assert key.doc


def test_file_and_env_priority(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("project:\n  dump_buffer:\n    path: from_file.jsonl\n    flush_size: 10\n"
                    "telemetry_capture:\n  cpu: true\nlog:\n  log_stream_level: warning\n"
                    "unknown_section:\n  x: 1\n")
    env = {"FLOWCEPT_SETTINGS_PATH": str(path), "FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE": "77"}
    settings = load_settings(env=env)
    assert settings.path == str(path)
    assert settings["project.dump_buffer.path"] == "from_file.jsonl"
    assert settings["project.dump_buffer.flush_size"] == 77  # env beats file
    assert settings["telemetry_capture.cpu"] is True
    assert settings["log.log_stream_level"] == "warning"
    assert settings.extra == {"unknown_section.x": 1}


def test_rendered_yaml_round_trips(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(render_yaml())
    settings = load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(path)})
    for key in KEYS:
        assert settings[key.name] == load_settings(env={})[key.name], key.name


@pytest.mark.parametrize("variable,value,key", [
    ("FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE", "lots", "project.dump_buffer.flush_size"),
    ("FLOWCEPT_PROJECT_DUMP_BUFFER_ENABLED", "maybe", "project.dump_buffer.enabled"),
    ("FLOWCEPT_PROJECT_DUMP_BUFFER_FSYNC", "sometimes", "project.dump_buffer.fsync"),
    ("FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_INTERVAL_S", "-1", "project.dump_buffer.flush_interval_s"),
    ("FLOWCEPT_LOG_LOG_STREAM_LEVEL", "loud", "log.log_stream_level"),
])
def test_wrong_env_value_names_the_key(variable, value, key):
    with pytest.raises(SettingsError) as info:
        load_settings(env={variable: value})
    assert key in str(info.value) and variable in str(info.value)


def test_wrong_file_value_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("project:\n  dump_buffer:\n    flush_size: [1, 2]\n")
    with pytest.raises(SettingsError) as info:
        load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(path)})
    assert "project.dump_buffer.flush_size" in str(info.value) and str(path) in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(SettingsError, match="FLOWCEPT_SETTINGS_PATH"):
        load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(tmp_path / "missing.yaml")})
    broken = tmp_path / "broken.yaml"
    broken.write_text("project: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(broken)})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(scalar)})


def test_settings_read_when_flowcept_starts_not_at_import(tmp_path, monkeypatch):
    import os

    first = tmp_path / "one" / "buf.jsonl"
    second = tmp_path / "two" / "buf.jsonl"
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", str(first))
    with Flowcept(workflow_id="s1") as a:
        FlowceptTask(activity_id="x", generated={"a": 1})
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", str(second))
    with Flowcept(workflow_id="s2") as b:
        FlowceptTask(activity_id="y", generated={"a": 1})
    assert os.path.dirname(a.output_path) == str(first.parent)
    assert os.path.dirname(b.output_path) == str(second.parent)


def test_wrong_setting_fails_at_start(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_FLUSH_SIZE", "x")
    with pytest.raises(SettingsError, match="project.dump_buffer.flush_size"):
        Flowcept().start()
    assert not Flowcept._active
