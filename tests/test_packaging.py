"""Packaging: every subpackage is listed; `import flowcept` stays cheap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("zmq", "h5py", "pymongo", "pynvml", "mpi4py", "pandas", "matplotlib", "numpy", "psutil", "yaml")


def test_every_subpackage_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = setuptools.get("package-dir", {})
    assert mapping.get("flowcept.daemon") == "daemon" and mapping.get("flowcept.launch") == "launch"
    found = set()
    for folder, package in (("flowcept", "flowcept"), ("daemon", "flowcept.daemon"),
                            ("launch", "flowcept.launch")):
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = Path(dirpath).relative_to(ROOT / folder)
                found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found - listed == set(), f"subpackages missing from [tool.setuptools] packages: {found - listed}"
    assert listed - found == set(), f"listed packages without __init__.py: {listed - found}"


def test_import_flowcept_is_light():
    code = ("import sys, flowcept; from flowcept import Flowcept, FlowceptTask, flowcept_task; "
            "from flowcept.instrumentation.flowcept_loop import FlowceptLoop; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported by `import flowcept`: {out.stdout.strip()}"


def test_capture_path_is_light(tmp_path):
    """A whole run with tasks, decorator and loop imports none of the heavy modules either."""
    code = ("import sys\nfrom flowcept import Flowcept, FlowceptTask, flowcept_task, FlowceptLoop\n"
            "@flowcept_task\ndef f(x):\n    return x\n"
            "with Flowcept(workflow_id='light'):\n"
            "    FlowceptTask(activity_id='a', generated={'x': 1}); f(1)\n"
            "    for _ in FlowceptLoop(2): pass\n"
            f"print(','.join(m for m in {HEAVY[:6]!r} if m in sys.modules))\n")
    env = dict(os.environ, FLOWCEPT_PROJECT_DUMP_BUFFER_PATH=str(tmp_path / "b.jsonl"),
               FLOWCEPT_TELEMETRY_CAPTURE_MACHINE_INFO="false")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported by a run: {out.stdout.strip()}"


def test_all_extra_holds_every_feature_extra():
    """``pip install flowcept[all]`` brings every optional feature the issues name."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    all_of = extras["all"][0].split("[", 1)[1].rstrip("]").split(",")
    features = set(extras) - {"all", "test"}
    assert features <= set(all_of), features - set(all_of)
