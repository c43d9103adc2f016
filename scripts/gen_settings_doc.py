"""Regenerate docs/settings.md from flowcept.settings.KEYS (the single source of truth)."""

import json
import os

from flowcept.settings import KEYS, SETTINGS_PATH_VARIABLE


def render() -> str:
    """The markdown page."""
    lines = [
        "# Settings reference",
        "",
        "Generated from `flowcept/settings.py` by `python scripts/gen_settings_doc.py`; do not edit by hand.",
        "",
        f"Settings are read when `Flowcept` starts (never frozen at import) from, in increasing priority: "
        f"the built-in defaults (no service needed), `settings.yaml` (the path in `{SETTINGS_PATH_VARIABLE}`, "
        "else `~/.flowcept/settings.yaml`), and one `FLOWCEPT_*` variable per key. A wrong value raises "
        "`flowcept.settings.SettingsError` naming the key and where the value came from. "
        "`flowcept settings init` writes a file with every key; `flowcept settings show` prints what is in effect. "
        "A section that must be a mapping but holds a value is an error naming it; unknown keys inside Flowcept's "
        "sections are kept and reported in one warning (`flowcept.settings.SettingsWarning`) with the closest "
        "known key, except keys the reference flowcept 1.0.3 settings file has. Unknown top-level sections are "
        "ignored quietly.",
        "",
        "Booleans accept true/false/1/0/yes/no/on/off; lists accept a JSON array or comma-separated text.",
        "",
        "| key | default | type | variable | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in KEYS:
        default = "null" if key.default is None else json.dumps(key.default)
        lines.append(f"| `{key.name}` | `{default}` | {key.kind.replace('|', ' / ')} | `{key.env_var}` | {key.doc} |")
    lines += [
        "",
        "Placement variables (set by `flowcept-launch`, usable by hand to simulate nodes in tests): "
        "`FLOWCEPT_HOSTNAME`, `FLOWCEPT_NODE_NAME`, `FLOWCEPT_NODE_ID`, `FLOWCEPT_RANK`, `FLOWCEPT_WORLD_SIZE`, "
        "`FLOWCEPT_LOCAL_RANK`, `FLOWCEPT_LOCAL_SIZE`, `FLOWCEPT_JOB_ID`, `FLOWCEPT_STEP_ID`, `FLOWCEPT_USER`. "
        "Run identity: `FLOWCEPT_WORKFLOW_ID`, `FLOWCEPT_CAMPAIGN_ID`, `FLOWCEPT_BUNDLE_EXEC_ID` (used when the "
        "application passes none). `FLOWCEPT_MPI=0` keeps Flowcept from using mpi4py even when it is initialised.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "settings.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render())
    print(f"wrote {os.path.normpath(path)}")
