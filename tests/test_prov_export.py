"""W3C PROV-JSON export, read back with the ``prov`` package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowcept.report.prov import export_prov_json, to_prov_document

prov_model = pytest.importorskip("prov.model")

APP = r'''
from flowcept import Flowcept, FlowceptTask, FlowceptLoop
with Flowcept(workflow_name="pipeline", campaign_id="c-prov") as f:
    with FlowceptTask(activity_id="make", used={"seed": 1}) as parent:
        with FlowceptTask(activity_id="child", used={"k": "v"}) as child:
            child.end(generated={"part": [1, 2]})
        parent.end(generated={"x": 5, "weird key/é": {"a": None}})
    with FlowceptTask(activity_id="consume", used={"x": 5}) as t:
        t.end(generated={"y": 25})
    for i in FlowceptLoop(range(2), loop_name="it"):
        pass
print(f.current_workflow_id)
'''


def read_back(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prov reader must not even warn about our output
        return prov_model.ProvDocument.deserialize(source=str(path), format="json")


@pytest.fixture
def real_run(flowcept_tmp: Path) -> tuple:
    script = flowcept_tmp / "app.py"
    script.write_text(APP)
    env = dict(os.environ, FLOWCEPT_PROJECT_DUMP_BUFFER_PATH=str(flowcept_tmp / "flowcept_buffer.jsonl"))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    wid = proc.stdout.decode().split()[-1]
    return wid, flowcept_tmp / f"flowcept_buffer_{wid}.jsonl"


def records_of(doc, kind):
    return [r for r in doc.get_records() if isinstance(r, kind)]


def test_round_trip_of_a_real_run(real_run, flowcept_tmp):
    wid, path = real_run
    result = export_prov_json(output_path="out.json", input_jsonl_path=str(path))
    assert result["input_mode"] == "jsonl" and result["bundles"] == 1
    assert result["activities"] == 6  # make, child, consume, loop, 2 iterations
    doc = read_back(flowcept_tmp / "out.json")
    bundles = list(doc.bundles)
    assert len(bundles) == 1 and str(bundles[0].identifier).endswith(wid)
    bundle = bundles[0]
    activities = records_of(bundle, prov_model.ProvActivity)
    assert len(activities) == 6
    make = next(a for a in activities if ("flowcept:activity_id", "make") in
                {(str(k), v) for k, v in a.attributes})
    assert make.get_startTime() is not None and make.get_endTime() >= make.get_startTime()
    used = records_of(bundle, prov_model.ProvUsage)
    generated = records_of(bundle, prov_model.ProvGeneration)
    assert len(used) == 1 + 1 + 1 + 1 + 2 * 2  # seed, k, x, items_length, (i, item) x 2
    assert len(generated) == 1 + 2 + 1 + 1  # part, x + weird key, y, iterations
    informed = records_of(bundle, prov_model.ProvCommunication)
    assert len(informed) == 1  # child was informed by make
    assert records_of(bundle, prov_model.ProvAssociation)
    agents = records_of(bundle, prov_model.ProvAgent)
    assert any("host_" in str(a.identifier) for a in agents)
    assert any("process_" in str(a.identifier) for a in agents)
    # the workflow: a plan in its bundle, a prov:Bundle entity attributed to the user at the top level
    assert any("plan_" in str(e.identifier) for e in records_of(bundle, prov_model.ProvEntity))
    assert records_of(doc, prov_model.ProvAttribution)
    # the data flow: the x=5 that make generated is the entity consume used
    x_generated = {str(g.args[0]) for g in generated if "data_x_" in str(g.args[0])}
    x_used = {str(u.args[1]) for u in used if "data_x_" in str(u.args[1])}
    assert x_generated and x_generated == x_used


def test_document_is_plain_json_and_stable_through_prov_serialisation(real_run, flowcept_tmp):
    _, path = real_run
    export_prov_json(output_path="a.json", input_jsonl_path=str(path), indent=True)
    doc = read_back(flowcept_tmp / "a.json")
    again = flowcept_tmp / "b.json"
    again.write_text(doc.serialize(format="json"))
    assert read_back(again) == doc
    assert "prefix" in json.loads((flowcept_tmp / "a.json").read_text())


def test_ranks_users_campaign_of_synthetic_records(flowcept_tmp):
    records = [{"type": "workflow", "workflow_id": w, "name": w, "campaign_id": "c", "user": "alice"}
               for w in ("w1", "w2")]
    records += [{"type": "task", "task_id": f"{w}.{r}", "workflow_id": w, "activity_id": "step", "rank": r,
                 "hostname": f"n{r % 2}", "login_name": "alice", "started_at": 10.0, "ended_at": 11.0,
                 "status": "FINISHED", "used": {"rank": r, "arr": [1.5, float("nan")]}}
                for w in ("w1", "w2") for r in range(4)]
    document = to_prov_document(records)
    assert len(document["bundle"]) == 2
    path = flowcept_tmp / "c.json"
    path.write_bytes(json.dumps(document).encode())
    doc = read_back(path)
    for bundle in doc.bundles:
        agents = {str(a.identifier) for a in records_of(bundle, prov_model.ProvAgent)}
        assert sum("rank_" in a for a in agents) == 4
        assert {"flowcept:host_n0", "flowcept:host_n1", "flowcept:user_alice"} <= agents
        delegations = records_of(bundle, prov_model.ProvDelegation)
        assert len(delegations) == 8  # each rank acts for its host and for the user
    top_entities = records_of(doc, prov_model.ProvEntity)
    assert len(top_entities) == 2


def test_export_by_workflow_id_and_cli(real_run, flowcept_tmp):
    from flowcept.cli import main

    wid, path = real_run
    result = export_prov_json(workflow_id=wid)
    assert result["input_mode"] == "db"
    assert result["output_path"] == str(flowcept_tmp / "PROVENANCE.prov.json")
    out = CliRunner().invoke(main, ["export", "--format", "prov-json", "--input", str(path), "-o", "cli.json"])
    assert out.exit_code == 0, out.output
    assert "6 activities" in out.output
    assert len(records_of(list(read_back(flowcept_tmp / "cli.json").bundles)[0], prov_model.ProvActivity)) == 6
    out = CliRunner().invoke(main, ["export", "--input", "nope.jsonl"])
    assert out.exit_code != 0 and "not found" in out.output
