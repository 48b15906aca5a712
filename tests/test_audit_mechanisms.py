"""`safecl audit` shows the safety-keeping mechanisms of each stage and their cost, the gate's
repair stages and where a run started from.

Built on a real tiny run with replay (+ distillation), a KL refusal anchor and the safety merge
(``recipe_text``), and a real second run started from its safety stage (``--from``). A repair stage and
the mechanisms the tiny run does not use (refusal direction, direction anchor, safety-aware
allocation) are hand-added to copies, in the format the trainer writes (see
safecl/training/repair.py and safecl/training/mechanisms.py); each such test says so."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_audit import audit, audit_json, copy_run, read, write
from tests.test_keep_safety_runs import BASE, MECHANISMS

# the mechanism run of tests/test_keep_safety_runs.py: replay + distill, a KL anchor, the merge
def recipe_text(out: Path) -> str:
    return BASE.format(out=out, allocation="magnitude", task_extra=MECHANISMS, rest="")
TERM_KEYS = ("mean", "last", "seconds", "seconds_per_step", "share_of_stage_time")


def train(recipe: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "safecl", "train", str(recipe), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mechanisms")
    path = root / "mechanisms.yaml"
    path.write_text(recipe_text(root / "run"))
    return path


@pytest.fixture(scope="session")
def mech(recipe) -> Path:
    """The tiny run: safety, then arithmetic with replay + distill, a KL anchor and the merge."""
    train(recipe)
    return recipe.parent / "run"


@pytest.fixture(scope="session")
def adopted(mech, recipe) -> Path:
    """A run started from ``mech``'s safety stage, its arithmetic stage plain."""
    out = recipe.parent / "adopted"
    train(recipe, "--from", f"{mech}:safety", f"output_dir={out}", "stages.1.replay=null", "stages.1.anchor=null",
          "stages.1.merge=null")
    return out


def metrics(run: Path, name: str, index: int) -> dict:
    return read(run / "stages" / f"{index:02d}-{name}" / "metrics.json")


def stage_of(doc: dict, name: str) -> dict:
    return next(st for st in doc["runs"][0]["stages"] if st["name"] == name)


# ----- JSON: the numbers are those of metrics.json ----------------------------------------------
def test_json_mechanisms_and_cost_equal_the_metrics(mech, capsys):
    doc = audit_json(capsys, mech)
    m = metrics(mech, "arithmetic", 1)
    mechs, train_ = m["mechanisms"], m["train"]
    assert set(mechs) == {"replay", "anchor", "replay_distill", "merge"} and set(train_["terms"]) == {
        "anchor_kl", "replay_distill"}
    st = stage_of(doc, "arithmetic")
    got = st["mechanisms"]
    assert got["replay"] == mechs["replay"] and got["replay_distill"] == mechs["replay_distill"]
    assert got["anchor"] == {**mechs["anchor"], "loss": "kl"}
    assert got["merge"] == {k: v for k, v in mechs["merge"].items() if k != "scaled_modules"}
    assert got["merge"]["scaled"] == len(mechs["merge"]["scaled_modules"])
    cost = st["cost"]
    assert cost["train_seconds"] == train_["seconds"]
    for name, term in train_["terms"].items():
        assert cost["terms"][name] == {k: term[k] for k in TERM_KEYS}
    terms = train_["terms"].values()
    assert cost["terms_seconds_per_step"] == pytest.approx(sum(t["seconds_per_step"] for t in terms), abs=1e-5)  # 6 decimals
    assert cost["terms_share_of_stage_time"] == pytest.approx(sum(t["share_of_stage_time"] for t in terms), abs=1e-5)
    assert cost["teacher_seconds"] == mechs["anchor"]["teacher_seconds"]
    assert cost["merge_seconds"] == mechs["merge"]["seconds"]
    assert cost["sensitivity_seconds"] is None and cost["direction_seconds"] is None
    assert cost["extra_seconds"] == pytest.approx(sum(t["seconds"] for t in terms) + mechs["anchor"]["teacher_seconds"]
                                                  + mechs["merge"]["seconds"], abs=1e-5)
    safety = stage_of(doc, "safety")
    assert safety["mechanisms"] == {} and safety["cost"]["extra_seconds"] is None
    assert safety["repair_of"] is None and st["repair_of"] is None and safety["adopted_from"] is None
    run = doc["runs"][0]
    assert run["started_from"] is None
    safety_seconds = metrics(mech, "safety", 0)["train"]["seconds"]
    assert run["cost"]["train_seconds"] == pytest.approx(train_["seconds"] + safety_seconds, abs=1e-5)
    assert run["cost"]["extra_seconds"] == cost["extra_seconds"] and run["cost"]["repair_seconds"] is None


def test_terminal_names_each_mechanism_with_its_cost(mech, capsys):
    code, out, _ = audit(capsys, mech)
    assert code == 0
    m = metrics(mech, "arithmetic", 1)
    r, a, g, t = m["mechanisms"]["replay"], m["mechanisms"]["anchor"], m["mechanisms"]["merge"], m["train"]["terms"]
    assert "safety mechanisms and their cost" in out
    assert re.search(r"^\s+00 safety: train [\d.]+ s; plain$", out, re.M)
    assert f"01 arithmetic: train {m['train']['seconds']:.1f} s, mechanisms +" in out
    d, k = t["replay_distill"], t["anchor_kl"]
    assert (f"replay {r['share']:.0%} ({r['replay_rows']} rows, distill {r['distill']}, "
            f"+{d['seconds_per_step']:.2f} s/step, {d['share_of_stage_time']:.0%} of stage time)") in out
    assert (f"anchor kl ({a['anchors']} anchors, +{k['seconds_per_step']:.2f} s/step, "
            f"{k['share_of_stage_time']:.0%} of stage time)") in out
    assert f"merge {g['scaled']}/{g['modules']} modules scaled x{g['scale']} (cos < {g['threshold']}" in out
    assert "started from" not in out


# ----- repair stages ----------------------------------------------------------------------------
def add_repair(run: Path, *, halted: bool = False) -> dict:
    """Hand-add what gate action ``repair`` writes after 'arithmetic' failed the gate (the tiny
    model's scores cannot make a real gate fire): the stage's gate record, a stage directory
    ``01-arithmetic.repair1`` (metrics with repair_of / attempt, a mask), its run.json entry and
    its retention row. Returns the repair metrics."""
    task = run / "stages" / "01-arithmetic"
    m = read(task / "metrics.json")
    m["gate"].update(fired=True, action="repair", reasons=["over-refusal 0.250 > gate.max_over_refusal 0"])
    write(task / "metrics.json", m)
    rdir = run / "stages" / "01-arithmetic.repair1"
    rdir.mkdir()
    shutil.copy(task / "mask.safetensors", rdir / "mask.safetensors")
    rm = {"stage": "arithmetic.repair1", "index": 1, "kind": "safety", "repair_of": "arithmetic", "attempt": 1,
          "method": "lori-s", "data": {"rows": 16, "encoded": 16},
          "mask": {**m["mask"], "density": 0.05, "capacity_used": m["mask"]["capacity_used"] + 0.05},
          "train": {"steps": 2, "seconds": 0.75, "first_loss": 5.5, "last_loss": 5.4, "mean_loss_last10": 5.45},
          "retention": {**m["retention"], "seconds": 0.1},
          "gate": {**m["gate"], "fired": halted, "action": "repair" if halted else "none",
                   "reasons": m["gate"]["reasons"] if halted else []}}
    write(rdir / "metrics.json", rm)
    info = read(run / "run.json")
    info["stages"].append({"index": 1, "name": "arithmetic.repair1", "kind": "safety", "repair_of": "arithmetic",
                           "dir": "stages/01-arithmetic.repair1", "train_seconds": 0.75, "check_seconds": 0.1,
                           "gate": rm["gate"]["action"]})
    if halted:
        info.update(status="halted", halted_at="arithmetic", reasons=m["gate"]["reasons"])
    write(run / "run.json", info)
    matrix = read(run / "retention.json")
    matrix["rows"].append({**matrix["rows"][-1], "stage": "arithmetic.repair1"})
    write(run / "retention.json", matrix)
    return rm


def test_repair_stage_follows_the_stage_it_repairs(mech, tmp_path, capsys):
    run = copy_run(mech, tmp_path / "repaired")
    add_repair(run)
    doc = audit_json(capsys, run)
    a = doc["runs"][0]
    assert [st["name"] for st in a["stages"]] == ["safety", "arithmetic", "arithmetic.repair1"]
    assert not a["warnings"]
    rep = a["stages"][2]
    assert rep["index"] == 1 and rep["kind"] == "safety" and rep["state"] == "checked"
    assert rep["repair_of"] == "arithmetic" and rep["attempt"] == 1
    assert rep["mechanisms"] == {"repair": {"of": "arithmetic", "attempt": 1, "steps": 2, "density": 0.05}}
    assert rep["cost"]["train_seconds"] == 0.75 and a["cost"]["repair_seconds"] == 0.75
    assert rep["mask"]["density"] == 0.05 and rep["dir"].endswith("01-arithmetic.repair1")
    assert a["stages"][1]["verdict"] == "gate fired (repair)" and rep["verdict"] == "kept"
    assert [r["checkpoint"] for r in a["matrix"]][-1] == "arithmetic.repair1"
    assert a["summary"]["final_stage"] == "arithmetic.repair1"
    code, out, _ = audit(capsys, run)
    assert code == 0
    assert re.search(r"^\s+01 arithmetic\.repair1\s+checked", out, re.M)  # the per-stage table
    assert "01 arithmetic.repair1: train 0.8 s" in out and "repair pass 1 of arithmetic (2 steps, density 0.05)" in out
    assert re.search(r"\[ok\] 01 arithmetic\.repair1\s+kept  \(repair pass 1 of 'arithmetic'\)", out)
    assert "repair passes 0.8 s" in out
    # while it trains: a repair directory without metrics and without its run.json entry yet
    (run / "stages" / "01-arithmetic.repair1" / "metrics.json").unlink()
    info = read(run / "run.json")
    write(run / "run.json", {**info, "status": "running", "stages": info["stages"][:2]})
    a = audit_json(capsys, run)["runs"][0]
    assert [st["name"] for st in a["stages"]] == ["safety", "arithmetic", "arithmetic.repair1"] and not a["warnings"]
    assert a["stages"][2]["repair_of"] == "arithmetic" and a["stages"][2]["verdict"] == "in progress"
    assert a["stages"][1]["name"] == "arithmetic" and a["stages"][1]["mechanisms"]["merge"]


def test_report_has_the_mechanisms_table(mech, tmp_path, capsys):
    run = copy_run(mech, tmp_path / "halted")
    add_repair(run, halted=True)
    code, _, _ = audit(capsys, run, "--report")
    assert code == 0
    html = (run / "report" / "report.html").read_text()
    assert "<h3>Safety mechanisms and their cost</h3>" in html
    table = html[html.index("<h3>Safety mechanisms and their cost</h3>"):]
    table = table[:table.index("</table>")]
    for head in ("mechanisms", "train s", "loss terms s/step", "loss terms share of stage time", "teacher s",
                 "merge s", "mechanisms total s"):
        assert f"<th>{head}</th>" in table
    m = metrics(mech, "arithmetic", 1)
    k = m["train"]["terms"]["anchor_kl"]
    assert f"anchor kl (8 anchors, +{k['seconds_per_step']:.2f} s/step" in table
    assert "modules scaled x0.5 (cos &lt; 0.5" in table and "repair pass 1 of arithmetic" in table
    share = sum(t["share_of_stage_time"] for t in m["train"]["terms"].values())
    assert f">{share:.0%}</td>" in table
    assert "repair pass 1 of arithmetic" in html.split("<h3>Stages</h3>")[1].split("</table>")[0]  # why column
    md = (run / "report" / "report.md").read_text()
    assert "### Safety mechanisms and their cost" in md and "| 01 arithmetic.repair1 | repair pass 1" in md


# ----- started from another run -----------------------------------------------------------------
def test_started_from_another_run(adopted, mech, tmp_path, capsys):
    info = read(adopted / "run.json")
    assert info["started_from"]["run"] == str(mech.resolve())
    a = audit_json(capsys, adopted)["runs"][0]
    assert a["started_from"] == info["started_from"]
    safety, task = a["stages"]
    assert safety["adopted_from"] == str(mech.resolve()) and task["adopted_from"] is None
    assert task["mechanisms"] == {} and task["cost"]["terms"] == {}
    code, out, _ = audit(capsys, adopted)
    assert code == 0
    sf = info["started_from"]
    assert f"  started from {sf['run']}:safety (adopted: safety; retention rows {sf['retention_rows']})" in out
    assert f"(adopted from {mech.resolve()})" in out
    assert "safety mechanisms: none" in out
    code, out, _ = audit(capsys, mech, adopted, f"--report={tmp_path / 'cmp'}")
    assert code == 0
    assert re.search(r"started from\s+-\s+" + re.escape(f"{sf['run']}:safety"), out)
    assert re.search(r"mechanisms arithmetic\s+replay \+ distill, anchor kl, merge\s+-", out)
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert f"started from {sf['run']}:safety" in html and "00 safety (adopted)" in html


# ----- the mechanisms the tiny run does not use -------------------------------------------------
def test_direction_anchor_allocation_and_refusal_direction(mech, tmp_path, capsys):
    """Hand-written metrics in the trainer's format for refusal_direction, a direction anchor and
    safety-aware allocation (numbers from a tiny run of that recipe)."""
    run = copy_run(mech, tmp_path / "direction")
    s = metrics(run, "safety", 0)
    s["refusal_direction"] = {"file": "refusal_direction.safetensors", "best_layer": 2, "n_harmful": 4,
                              "n_harmless": 4, "separation_best": 6.4002, "seconds": 1.967}
    write(run / "stages" / "00-safety" / "metrics.json", s)
    m = metrics(run, "arithmetic", 1)
    m["mechanisms"] = {"anchor": {"prompts": 8, "anchors": 8, "tokens": 4, "teacher_seconds": 2.8,
                                  "direction_layer": 2},
                       "allocation": {"rule": "safety-aware", "strength": 0.5, "sensitivity_anchors": 8,
                                      "sensitivity_seconds": 3.001}}
    m["calibration"]["allocation"] = "safety-aware"
    m["train"]["terms"] = {"anchor_direction": {"mean": 1.8e-05, "last": 2.7e-05, "seconds": 7.38,
                                                "seconds_per_step": 2.46, "share_of_stage_time": 0.596,
                                                "values": [0.0, 1e-05, 2.7e-05]}}
    write(run / "stages" / "01-arithmetic" / "metrics.json", m)
    a = audit_json(capsys, run)["runs"][0]
    safety, task = a["stages"]
    assert safety["mechanisms"] == {"refusal_direction": s["refusal_direction"]}
    assert safety["cost"]["direction_seconds"] == 1.967 == safety["cost"]["extra_seconds"]
    assert task["mechanisms"]["anchor"]["loss"] == "direction"
    assert task["mechanisms"]["allocation"] == m["mechanisms"]["allocation"]
    assert task["cost"]["sensitivity_seconds"] == 3.001 and task["cost"]["teacher_seconds"] == 2.8
    assert "values" not in task["cost"]["terms"]["anchor_direction"]
    assert task["cost"]["extra_seconds"] == pytest.approx(7.38 + 2.8 + 3.001)
    _, out, _ = audit(capsys, run)
    assert "refusal direction (layer 2, separation 6.40, 4+4 prompts, 1.97 s)" in out
    assert "anchor direction (8 anchors, layer 2, +2.46 s/step, 60% of stage time)" in out
    assert "safety-aware allocation (strength 0.5, 8 anchors, 3.00 s)" in out
    # anchors that only feed the allocation: no anchor loss, their teacher time goes to the allocation
    m["train"]["terms"] = {}
    m["mechanisms"]["anchor"].pop("direction_layer")
    write(run / "stages" / "01-arithmetic" / "metrics.json", m)
    a = audit_json(capsys, run)["runs"][0]
    assert a["stages"][1]["mechanisms"]["anchor"]["loss"] is None
    _, out, _ = audit(capsys, run)
    assert "anchor " not in out.split("safety mechanisms and their cost")[1].split("total:")[0]
    assert "safety-aware allocation (strength 0.5, 8 anchors, 5.80 s)" in out
    assert json.dumps(a)  # JSON-ready
