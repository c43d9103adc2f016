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


# -- project.dump_buffer.path: empty is an error, a directory means "files inside it" ------------------

@pytest.mark.parametrize("value", ["", "   "])
def test_empty_buffer_path_from_env_names_the_key(value):
    with pytest.raises(SettingsError) as info:
        load_settings(env={"FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": value})
    assert "project.dump_buffer.path" in str(info.value)
    assert "FLOWCEPT_PROJECT_DUMP_BUFFER_PATH" in str(info.value)


def test_empty_buffer_path_from_file_names_key_and_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("project:\n  dump_buffer:\n    path: ''\n")
    with pytest.raises(SettingsError) as info:
        load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(path)})
    assert "project.dump_buffer.path" in str(info.value) and str(path) in str(info.value)


def test_empty_buffer_path_fails_at_start(monkeypatch):
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", "")
    with pytest.raises(SettingsError, match="project.dump_buffer.path"):
        Flowcept().start()
    assert not Flowcept._active


def test_directory_buffer_path_gets_the_default_file_name(tmp_path):
    import os

    from flowcept.settings import DEFAULT_BUFFER_FILE_NAME
    from flowcept.transport import split_base_path

    existing = tmp_path / "existing"
    existing.mkdir()
    cases = {
        str(tmp_path / "new") + os.sep: str(tmp_path / "new" / DEFAULT_BUFFER_FILE_NAME),  # need not exist
        str(existing): str(existing / DEFAULT_BUFFER_FILE_NAME),
        str(existing) + os.sep: str(existing / DEFAULT_BUFFER_FILE_NAME),
        str(tmp_path / "runs" / "w1"): str(tmp_path / "runs" / "w1"),  # no such directory: a stem
        str(tmp_path / "b.jsonl"): str(tmp_path / "b.jsonl"),
    }
    for given, wanted in cases.items():
        resolved = load_settings(env={"FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": given})["project.dump_buffer.path"]
        assert os.path.normpath(resolved) == wanted, given
    # explicit paths (CLI --path, read_buffer_file(file_path=...)) follow the same rule
    assert split_base_path(str(existing)) == (str(existing), "flowcept_buffer", ".jsonl")
    assert split_base_path(str(tmp_path / "new") + os.sep) == (str(tmp_path / "new"), "flowcept_buffer", ".jsonl")
    assert split_base_path(str(tmp_path / "w1")) == (str(tmp_path), "w1", ".jsonl")


def test_tilde_in_buffer_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    resolved = load_settings(env={"FLOWCEPT_PROJECT_DUMP_BUFFER_PATH": "~/buf.jsonl"})
    assert resolved["project.dump_buffer.path"] == str(tmp_path / "buf.jsonl")


@pytest.mark.parametrize("trailing_separator", [True, False])
def test_every_consumer_writes_inside_a_directory_path(tmp_path, monkeypatch, trailing_separator):
    """Per-process files, stop()'s consolidation, read_buffer_file() and the CLI all use the directory."""
    import os

    from click.testing import CliRunner

    from flowcept.cli import main

    runs = tmp_path / "runs" / "w1"
    runs.mkdir(parents=True)
    monkeypatch.setenv("FLOWCEPT_PROJECT_DUMP_BUFFER_PATH", str(runs) + (os.sep if trailing_separator else ""))
    with Flowcept(workflow_id="dir-a") as fc:
        FlowceptTask(activity_id="x").send()
    assert fc.output_path == str(runs / "flowcept_buffer_dir-a.jsonl")
    assert sorted(os.listdir(runs)) == ["flowcept_buffer_dir-a.jsonl"]
    assert not [p for p in os.listdir(runs.parent) if p != "w1"]  # nothing beside the directory
    assert [r["activity_id"] for r in Flowcept.read_buffer_file() if r.get("type") == "task"] == ["x"]

    monkeypatch.setenv("FLOWCEPT_PROJECT_CONSOLIDATE_ON_STOP", "false")
    with Flowcept(workflow_id="dir-b"):
        FlowceptTask(activity_id="y").send()
    (per_process,) = [p for p in os.listdir(runs) if p.startswith("flowcept_buffer_dir-b_")]
    result = CliRunner().invoke(main, ["consolidate", "--workflow-id", "dir-b", "--quiet"])
    assert result.exit_code == 0, result.output
    assert os.path.exists(runs / "flowcept_buffer_dir-b.jsonl")
    assert not os.path.exists(runs / per_process)
    records = Flowcept.read_buffer_file(workflow_id="dir-b")
    assert [r["activity_id"] for r in records if r.get("type") == "task"] == ["y"]


# -- the shape of the file: sections that must be mappings, unknown keys ------------------------------

@pytest.fixture
def settings_warnings():
    """The SettingsWarning messages issued meanwhile (shown whatever the log level)."""
    import warnings

    from flowcept import settings as settings_module

    settings_module._reported_unknown.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught if issubclass(w.category, settings_module.SettingsWarning)]


def _load_file(tmp_path, text: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_settings(env={"FLOWCEPT_SETTINGS_PATH": str(path)}), str(path)


@pytest.mark.parametrize("text,key", [
    ("project:\n  dump_buffer: 5\n", "project.dump_buffer"),
    ("project:\n  dump_buffer: [1, 2]\n", "project.dump_buffer"),
    ("project: yes\n", "project"),
    ("telemetry_capture: cpu\n", "telemetry_capture"),
    ("databases:\n  mongodb: true\n", "databases.mongodb"),
])
def test_section_that_is_not_a_mapping_names_the_key(tmp_path, text, key):
    with pytest.raises(SettingsError) as info:
        _load_file(tmp_path, text)
    message = str(info.value)
    assert f"'{key}'" in message and "mapping" in message and str(tmp_path / "s.yaml") in message


def test_mapping_where_a_value_is_expected_names_the_key(tmp_path):
    with pytest.raises(SettingsError, match="project.dump_buffer.path"):
        _load_file(tmp_path, "project:\n  dump_buffer:\n    path: {a: 1}\n")


def test_empty_section_keeps_the_defaults(tmp_path, settings_warnings):
    settings, _ = _load_file(tmp_path, "project:\n  dump_buffer:\ntelemetry_capture:\n")
    assert settings["project.dump_buffer.flush_size"] == 2000
    assert settings_warnings() == []


def test_unknown_key_warns_once_with_the_closest_key(tmp_path, settings_warnings):
    settings, path = _load_file(tmp_path, "project:\n  dump_buffer:\n    pth: x.jsonl\n    flush_sise: 3\n"
                                          "  flush_size: 4\n  zzzzzz: 1\n")
    assert settings.extra == {"project.dump_buffer.pth": "x.jsonl", "project.dump_buffer.flush_sise": 3,
                              "project.flush_size": 4, "project.zzzzzz": 1}
    (message,) = settings_warnings()
    assert path in message
    assert "project.dump_buffer.pth (did you mean project.dump_buffer.path?)" in message
    assert "project.dump_buffer.flush_sise (did you mean project.dump_buffer.flush_size?)" in message
    assert "project.flush_size (did you mean project.dump_buffer.flush_size?)" in message
    assert "project.zzzzzz" in message and "project.zzzzzz (" not in message
    load_settings(env={"FLOWCEPT_SETTINGS_PATH": path})  # read again (every start): no second warning
    assert len(settings_warnings()) == 1


def test_unknown_key_warns_but_flowcept_starts(tmp_path, monkeypatch, settings_warnings):
    path = tmp_path / "s.yaml"
    path.write_text("log:\n  log_stream_levle: debug\n")
    monkeypatch.setenv("FLOWCEPT_SETTINGS_PATH", str(path))
    with Flowcept(workflow_id="typo"):
        FlowceptTask(activity_id="x").send()
    (message,) = settings_warnings()
    assert "log.log_stream_levle (did you mean log.log_stream_level?)" in message


def test_unknown_top_level_sections_stay_quiet(tmp_path, settings_warnings):
    settings, _ = _load_file(tmp_path, "my_tool:\n  anything: 1\nextra_metadata:\n  tag: a\n")
    assert settings.extra == {"my_tool.anything": 1, "extra_metadata.tag": "a"}
    assert settings_warnings() == []


# The sections of the reference (flowcept 1.0.3) sample_settings.yaml that overlap ours, as shipped.
REFERENCE_SAMPLE = """\
flowcept_version: 1.0.3
project:
  debug: true
  json_serializer: default
  replace_non_json_serializable: true
  performance_logging: false
  enrich_messages: false
  db_flush_mode: offline
  dump_buffer:
    enabled: false
    path: flowcept_buffer.jsonl
    append_id_to_path: true
    append_workflow_id_to_path: true
    delete_previous_file: false
log:
  log_path: "default"
  log_file_level: error
  log_stream_level: error
telemetry_capture:
  gpu: ~
  cpu: false
  per_cpu: false
  process_info: false
  mem: false
  disk: false
  network: false
  machine_info: false
instrumentation:
  enabled: true
  torch:
    what: parent_and_children
    children_mode: telemetry_and_tensor_inspection
    epoch_loop: lightweight
    batch_loop: lightweight
    capture_epochs_at_every: 1
    register_workflow: true
experiment:
  user: root
mq:
  enabled: false
  type: redis
sys_metadata:
  environment_id: "laptop"
databases:
  lmdb:
    enabled: false
    path: flowcept_lmdb
  mongodb:
    enabled: false
    host: localhost
    port: 27017
    db: flowcept
    create_collection_index: true
    bin: /usr/bin/mongod
    db_path: /data/db
    log_path: /var/log/mongodb/mongod.log
    lock_file_path: /var/run/mongod.pid
"""


def test_reference_sample_settings_load_without_warning(tmp_path, settings_warnings):
    settings, _ = _load_file(tmp_path, REFERENCE_SAMPLE)
    assert settings["project.dump_buffer.enabled"] is False
    assert settings["project.dump_buffer.path"] == "flowcept_buffer.jsonl"
    assert settings["experiment.user"] == "root"
    assert settings.extra["instrumentation.torch.what"] == "parent_and_children"
    assert settings_warnings() == []


def test_installed_reference_sample_settings_load_without_warning(settings_warnings):
    """The real file, where the reference package (flowcept 1.0.3) is unpacked on this machine."""
    import glob

    found = sorted(glob.glob("/tmp/ref/src/resources/sample_settings.yaml")
                   + glob.glob("/tmp/refvenv/lib/python3*/site-packages/resources/sample_settings.yaml"))
    if not found:
        pytest.skip("reference package not unpacked here")
    for path in found:
        load_settings(env={"FLOWCEPT_SETTINGS_PATH": path})
    assert settings_warnings() == []
