"""Every setting Flowcept reads, its default, its type and the variable that overrides it.

Settings come from, in increasing priority: the built-in defaults below (they need no service),
``settings.yaml`` (``FLOWCEPT_SETTINGS_PATH``, else ``~/.flowcept/settings.yaml``), and one
``FLOWCEPT_*`` environment variable per key: the key in upper case with dots as underscores
(``project.dump_buffer.path`` -> ``FLOWCEPT_PROJECT_DUMP_BUFFER_PATH``). They are read when
``Flowcept`` starts (``load_settings()``), never frozen at import. A wrong value raises
:class:`SettingsError` naming the key; so does a section that must be a mapping but is not. Unknown
keys inside the sections Flowcept owns are kept (``Settings.extra``) and reported in one logged
warning with the closest known key, unless the reference package (flowcept 1.0.3) has them, so a
settings file written for it loads quietly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

logger = logging.getLogger(__name__)

SETTINGS_PATH_VARIABLE = "FLOWCEPT_SETTINGS_PATH"
DEFAULT_SETTINGS_PATH = os.path.join("~", ".flowcept", "settings.yaml")
#: File name used inside a directory given as project.dump_buffer.path.
DEFAULT_BUFFER_FILE_NAME = "flowcept_buffer.jsonl"
BUFFER_PATH_KEY = "project.dump_buffer.path"


class SettingsError(ValueError):
    """A setting has a value Flowcept cannot use; the message names the key."""


@dataclass(frozen=True)
class Key:
    """One documented setting."""

    name: str
    default: Any
    kind: str  # bool, int, float, str, list, choice:<a|b>, optional-str, optional-int
    doc: str

    @property
    def env_var(self) -> str:
        return "FLOWCEPT_" + self.name.upper().replace(".", "_")


_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f", ""}

KEYS: Tuple[Key, ...] = (
    # project: the in-process pipeline and its files
    Key("project.dump_buffer.enabled", True, "bool",
        "Stream records to per-process JSONL files as they flush (the embedded default)."),
    Key(BUFFER_PATH_KEY, DEFAULT_BUFFER_FILE_NAME, "str",
        "Base path: per-process files are <dir>/<stem>_<workflow_id>_<host>_<pid>.jsonl and the "
        "consolidated file <dir>/<stem>_<workflow_id>.jsonl. A path ending in a separator or naming "
        "an existing directory means files go inside that directory, named from "
        f"{DEFAULT_BUFFER_FILE_NAME}; a leading ~ is expanded; an empty path is an error."),
    Key("project.dump_buffer.delete_previous_file", False, "bool",
        "Delete the file at exactly project.dump_buffer.path when a Flowcept starts."),
    Key("project.dump_buffer.flush_interval_s", 0.5, "float",
        "Longest time a captured record waits in memory before it is written."),
    Key("project.dump_buffer.flush_size", 2000, "int",
        "Pending records flushed before the interval ends (by the capturing thread while writes are "
        "fast, else by the flusher)."),
    Key("project.dump_buffer.max_pending", 200000, "int",
        "Bound on records waiting in memory; past it the capturing thread writes them itself."),
    Key("project.dump_buffer.fsync", "stop", "choice:never|stop|flush",
        "When per-process files are fsynced: never, at stop()/exit, or after every flush."),
    Key("project.buffer_view_max_records", 10000, "int",
        "Records kept in memory for get_buffer() (~450 bytes each); past it get_buffer() reads the "
        "workflow's files."),
    Key("project.consolidate_on_stop", True, "bool",
        "stop() (rank 0 under MPI) merges the workflow's files into one output."),
    Key("project.output_format", "jsonl", "choice:jsonl|hdf5",
        "Format of the consolidated output written by stop() and `flowcept consolidate`."),
    Key("project.hdf5_parse_worker", True, "bool",
        "A large HDF5 consolidation parses task columns in a helper process (a second core) while "
        "it writes; false keeps it in one process."),
    Key("project.cleanup_files", True, "bool",
        "Remove the per-process/per-node files once they are consolidated."),
    Key("project.max_value_bytes", 8 * 1024 * 1024, "int",
        "A single value that serialises larger than this is replaced by a summary."),
    Key("project.debug", False, "bool", "Add debug: true to every record."),
    # instrumentation
    Key("instrumentation.enabled", True, "bool",
        "Capture tasks at all; when false FlowceptTask, the decorator and loops do nothing."),
    # telemetry
    Key("telemetry_capture.cpu", False, "bool", "CPU utilisation, times, frequency, load average."),
    Key("telemetry_capture.per_cpu", False, "bool", "Per-CPU utilisation as well."),
    Key("telemetry_capture.mem", False, "bool", "Virtual memory and swap."),
    Key("telemetry_capture.disk", False, "bool", "Disk usage and I/O counters."),
    Key("telemetry_capture.network", False, "bool", "Network I/O counters."),
    Key("telemetry_capture.process_info", False, "bool", "This process: RSS, CPU%, threads, fds, I/O."),
    Key("telemetry_capture.gpu", None, "optional-list",
        "GPU metrics to capture (null disables GPU telemetry), e.g. [used, power, utilization]."),
    Key("telemetry_capture.machine_info", True, "bool", "Put machine information on the workflow record."),
    Key("telemetry_capture.mode", "cached", "choice:cached|sync",
        "cached: a sampler thread refreshes a snapshot that tasks copy; sync: sample on the spot."),
    Key("telemetry_capture.interval_s", 1.0, "float", "Refresh interval of the cached snapshot."),
    Key("telemetry_capture.emit_interval_s", 0.0, "float",
        "When > 0, emit type: telemetry records for this process on this interval."),
    Key("telemetry_capture.env_allowlist", [], "list",
        "Extra environment variable names (or prefixes ending in *) copied into machine info."),
    # log
    Key("log.log_stream_level", "error", "choice:debug|info|warning|error|critical|disable",
        "Level of log lines printed to stderr."),
    Key("log.log_file_level", "disable", "choice:debug|info|warning|error|critical|disable",
        "Level of log lines written to log.log_path."),
    Key("log.log_path", "flowcept.log", "str", "Log file path when log.log_file_level is not disable."),
    # daemon
    Key("daemon.address", None, "optional-str",
        "Address of the node daemon (ipc:// or tcp://); set by flowcept-launch. Empty: no daemon."),
    Key("daemon.runtime_dir", None, "optional-str",
        "Runtime directory for ipc sockets and ready files (default: $XDG_RUNTIME_DIR or /tmp)."),
    Key("daemon.telemetry_interval_s", 1.0, "float", "Node telemetry sampling interval of the daemon."),
    Key("daemon.sinks", ["jsonl"], "list", "Sinks the daemon writes to: jsonl, hdf5, mongodb."),
    Key("daemon.ack_timeout_s", 5.0, "float",
        "Time a client waits for the daemon to acknowledge a batch before spilling to its file."),
    Key("daemon.max_message_bytes", 64 * 1024 * 1024, "int", "Largest message the daemon accepts."),
    Key("daemon.metrics_port", 0, "int", "Prometheus /metrics port (0: off)."),
    Key("daemon.metrics_host", "127.0.0.1", "str", "Address the /metrics endpoint binds to."),
    Key("daemon.tcp_port", 0, "int", "TCP port for cross-node use with CURVE (0: off)."),
    Key("daemon.jobs_dir", "~/.flowcept/jobs", "str",
        "Per-job directory (shared by all nodes) with the job's CURVE keys and each node daemon's TCP "
        "address, for `flowcept daemon status --job` and `flowcept top --job`."),
    # launch
    Key("launch.ready_timeout_s", 30.0, "float", "How long ranks wait for their node daemon."),
    Key("launch.finish_timeout_s", 120.0, "float", "How long rank 0 waits for all ranks to finish."),
    Key("launch.collect_wait_s", 60.0, "float",
        "How long a finished rank leaves its record to its node's starter (one file per node on the "
        "shared filesystem) before writing its own file."),
    Key("launch.remote_status", True, "bool",
        "Node daemons of a job also listen on TCP (ephemeral port, CURVE with per-job keys) and register "
        "in the job directory (daemon.jobs_dir), so `flowcept daemon status --job` sees every node."),
    # databases
    Key("databases.mongodb.enabled", False, "bool", "Write records to MongoDB as well."),
    Key("databases.mongodb.uri", None, "optional-str", "MongoDB URI (overrides host/port)."),
    Key("databases.mongodb.host", "localhost", "str", "MongoDB host."),
    Key("databases.mongodb.port", 27017, "int", "MongoDB port."),
    Key("databases.mongodb.db", "flowcept", "str", "Database name."),
    Key("databases.mongodb.spool_dir", None, "optional-str",
        "Where records wait on disk while MongoDB is unreachable (default: next to the buffer files)."),
    Key("databases.mongodb.spool_max_bytes", 1024 * 1024 * 1024, "int", "Bound on the spool."),
    Key("databases.mongodb.timeout_s", 2.0, "float", "Server selection / socket timeout."),
    # experiment
    Key("experiment.user", None, "optional-str", "User name recorded on workflows (default: login)."),
)

KEYS_BY_NAME: Dict[str, Key] = {k.name: k for k in KEYS}


def _convert(key: Key, value: Any, origin: str) -> Any:
    """Return value converted to the key's kind, or raise SettingsError naming key and origin."""

    def bad(expected: str) -> SettingsError:
        return SettingsError(
            f"setting '{key.name}' (from {origin}) must be {expected}, got {value!r}"
        )

    kind = key.kind
    from_text = isinstance(value, str)
    if kind.startswith("optional-"):
        if value is None or (from_text and value.strip().lower() in ("", "none", "null", "~")):
            return None
        kind = kind[len("optional-"):]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if from_text and value.strip().lower() in _TRUE:
            return True
        if from_text and value.strip().lower() in _FALSE:
            return False
        raise bad("a boolean (true/false)")
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise bad(f"a number ({kind})")
        try:
            number = int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise bad(f"a number ({kind})") from None
        if number < 0:
            raise bad("a non-negative number")
        return number
    if kind == "str":
        if value is None or isinstance(value, (dict, list, tuple)):
            raise bad("a string")
        return str(value)
    if kind == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
        if from_text:
            text = value.strip()
            if text.startswith("["):
                import json

                try:
                    parsed = json.loads(text)
                except ValueError:
                    raise bad("a list (JSON array or comma-separated)") from None
                if isinstance(parsed, list):
                    return parsed
            return [part.strip() for part in text.split(",") if part.strip()]
        raise bad("a list")
    if kind.startswith("choice:"):
        choices = kind[len("choice:"):].split("|")
        text = str(value).strip().lower()
        if text not in choices:
            raise bad("one of " + ", ".join(choices))
        return text
    raise AssertionError(f"unknown kind {kind}")  # a programming error in KEYS


#: Sections Flowcept owns: every proper prefix of a key (``project``, ``project.dump_buffer``, ...).
SECTIONS = frozenset(k.name.rsplit(".", i)[0] for k in KEYS for i in range(1, k.name.count(".") + 1))

#: Keys (or whole subtrees) inside our sections that the reference package (flowcept 1.0.3) reads
#: or ships in its sample settings: we ignore them, quietly, so an old settings file loads as is.
REFERENCE_KEYS = frozenset({
    "project.json_serializer", "project.replace_non_json_serializable", "project.performance_logging",
    "project.enrich_messages", "project.db_flush_mode",
    "project.dump_buffer.append_id_to_path", "project.dump_buffer.append_workflow_id_to_path",
    "instrumentation.torch",
    "databases.lmdb",
    "databases.mongodb.create_collection_index", "databases.mongodb.bin", "databases.mongodb.db_path",
    "databases.mongodb.log_path", "databases.mongodb.lock_file_path",
})


def _known_to_reference(dotted: str) -> bool:
    parts = dotted.split(".")
    return any(".".join(parts[:i]) in REFERENCE_KEYS for i in range(1, len(parts) + 1))


def _closest(dotted: str) -> Optional[str]:
    """The known key or section a misspelt ``dotted`` most likely meant (siblings first)."""
    import difflib  # only when a file has unknown keys: keeps `import flowcept` light

    section, _, leaf = dotted.rpartition(".")
    known = set(KEYS_BY_NAME) | SECTIONS
    siblings = {name.rpartition(".")[2]: name for name in known if name.rpartition(".")[0] == section}
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if match:
        return siblings[match[0]]
    elsewhere = sorted(name for name in known if not dotted.startswith(name + "."))  # not its own section
    match = difflib.get_close_matches(dotted, elsewhere, n=1, cutoff=0.6)
    return match[0] if match else None


def _flatten(tree: Dict[str, Any], origin: str, prefix: str = "",
             unknown: Optional[List[str]] = None) -> Dict[str, Any]:
    """Flatten the file's tree to dotted keys; check the shape of the sections we own.

    A section of ours that holds a scalar or list is an error (silently using the defaults would
    hide it); an empty one (``project:`` with nothing under it) is fine. Keys inside our sections
    that neither we nor the reference know are appended to ``unknown``; unknown top-level sections
    belong to the user or to other tools and are kept without a word.
    """
    flat: Dict[str, Any] = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if dotted in KEYS_BY_NAME:
            flat[dotted] = value
        elif dotted in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                example = next(k.name for k in KEYS if k.name.startswith(dotted + "."))
                raise SettingsError(
                    f"setting '{dotted}' (from {origin}) must be a mapping of keys (such as "
                    f"'{example}'), got {value!r}")
            flat.update(_flatten(value, origin, dotted + ".", unknown))
        else:
            if isinstance(value, dict) and value:
                flat.update(_flatten(value, origin, dotted + "."))
            else:
                flat[dotted] = value
            if prefix and unknown is not None and not _known_to_reference(dotted):
                unknown.append(dotted)
    return flat


#: (file, unknown keys) already reported in this process: load_settings runs at every start and
#: in several helpers, and one warning per file is enough.
_reported_unknown: Set[Tuple[str, Tuple[str, ...]]] = set()


class SettingsWarning(UserWarning):
    """A settings file holds keys Flowcept does not know (most likely typos)."""


def _report_unknown(path: str, unknown: List[str]) -> None:
    """One warning per file: a ``warnings`` warning, shown whatever ``log.log_stream_level`` says."""
    if not unknown or (path, tuple(unknown)) in _reported_unknown:
        return
    _reported_unknown.add((path, tuple(unknown)))
    described = []
    for dotted in unknown:
        guess = _closest(dotted)
        described.append(f"{dotted} (did you mean {guess}?)" if guess else dotted)
    import warnings

    warnings.warn(f"settings file {path}: unknown key{'s' if len(unknown) > 1 else ''} ignored: "
                  f"{', '.join(described)}", SettingsWarning, stacklevel=3)


def buffer_file_path(path: str) -> str:
    """Return the base buffer path to use for ``path``: a directory gets the default file name.

    Why: split_base_path takes the last component as the file stem, so ``/runs/w1/`` (or an
    existing directory ``/runs/w1``) would put ``w1_<workflow_id>.jsonl`` files in ``/runs``.
    """
    path = os.path.expanduser(path)
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if path.endswith(separators) or (path and os.path.isdir(path)):
        return os.path.join(path, DEFAULT_BUFFER_FILE_NAME)
    return path


def settings_path(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Return the settings file in use, or None when the built-in defaults apply."""
    env = os.environ if env is None else env
    explicit = env.get(SETTINGS_PATH_VARIABLE)
    if explicit:
        if not os.path.isfile(explicit):
            raise SettingsError(f"{SETTINGS_PATH_VARIABLE} points to '{explicit}', which is not a file")
        return explicit
    home = os.path.expanduser(DEFAULT_SETTINGS_PATH)
    return home if os.path.isfile(home) else None


class Settings:
    """A validated snapshot of every key; read with ``settings["project.dump_buffer.path"]``."""

    def __init__(self, values: Dict[str, Any], path: Optional[str], extra: Dict[str, Any]):
        self._values = values
        self.path = path
        self.extra = extra  # keys of the file Flowcept does not know (kept, e.g. for the workflow)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def section(self, prefix: str) -> Dict[str, Any]:
        """Return the keys under ``prefix.`` with the prefix stripped."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self._values.items() if k.startswith(prefix + ".")}

    def as_dict(self) -> Dict[str, Any]:
        """Nested dict of every key, as it would appear in settings.yaml."""
        tree: Dict[str, Any] = {}
        for name, value in self._values.items():
            node = tree
            parts = name.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return tree


def load_settings(env: Optional[Dict[str, str]] = None, path: Optional[str] = None) -> Settings:
    """Read defaults, the settings file and FLOWCEPT_* variables; validate every key."""
    env = os.environ if env is None else env
    path = path or settings_path(env)
    file_values: Dict[str, Any] = {}
    if path:
        import yaml  # only when there is a file: keeps `import flowcept` light

        try:
            with open(path, encoding="utf-8") as handle:
                tree = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise SettingsError(f"settings file '{path}' is not valid YAML: {error}") from None
        if not isinstance(tree, dict):
            raise SettingsError(f"settings file '{path}' must hold a mapping at top level")
        unknown: List[str] = []
        file_values = _flatten(tree, f"settings file {path}", unknown=unknown)
        _report_unknown(path, unknown)
    values: Dict[str, Any] = {}
    for key in KEYS:
        value = key.default
        origin = "default"
        if key.name in file_values:
            value, origin = file_values[key.name], f"settings file {path}"
        if key.env_var in env:
            value, origin = env[key.env_var], f"environment variable {key.env_var}"
        values[key.name] = _convert(key, value, origin) if value is not None or origin != "default" else None
        if key.name == BUFFER_PATH_KEY:
            if not values[key.name].strip():
                raise SettingsError(f"setting '{key.name}' (from {origin}) must name a file or a directory, "
                                    f"got an empty path")
            # Resolved once here so per-process files, consolidation, read_buffer_file and the CLI agree.
            values[key.name] = buffer_file_path(values[key.name])
    extra = {k: v for k, v in file_values.items() if k not in KEYS_BY_NAME}
    return Settings(values, path, extra)


def render_yaml(settings: Optional[Settings] = None) -> str:
    """Return a commented settings.yaml with every key (used by `flowcept settings init`)."""
    lines: List[str] = ["# Flowcept settings. Every key can be overridden by the variable named beside it."]
    current: List[str] = []
    values = settings._values if settings is not None else {k.name: k.default for k in KEYS}
    import json

    for key in KEYS:
        parts = key.name.split(".")
        common = 0
        while common < min(len(current), len(parts) - 1) and current[common] == parts[common]:
            common += 1
        for depth in range(common, len(parts) - 1):
            lines.append("  " * depth + parts[depth] + ":")
        current = parts[:-1]
        value = values[key.name]
        text = "null" if value is None else json.dumps(value)
        lines.append("  " * (len(parts) - 1) + f"{parts[-1]}: {text}  # {key.doc} [{key.env_var}]")
    return "\n".join(lines) + "\n"


#: Hooks that want to know when settings are (re)loaded, e.g. logging.
on_load: List[Callable[[Settings], None]] = []
