"""The safety-keeping mechanisms inside real runs of the tiny model: every mechanism on at once
(earlier stages stay bit-identical, costs recorded), gate action repair, and starting a run
from another run's safety stage."""

import json
import string
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

BASE = """\
seed: 0
output_dir: {out}
model: {{name: builtin:tiny-llama}}
adapter: {{method: lori-s, rank: 4, alpha: 8, density: 0.2, calibration_steps: 1, allocation: {allocation}}}
train: {{lr: 1.0e-2, max_steps: 3, batch_size: 4, max_seq_len: 128}}
stages:
  - {{name: safety, kind: safety, data: {{source: builtin:safety, limit: 16}}}}
  - name: arithmetic
    kind: task
    data: {{source: builtin:arithmetic, limit: 16}}
    eval: {{source: builtin:arithmetic, split: test, limit: 2}}
{task_extra}
retention:
  harmful: {{source: builtin:harmful-eval, limit: 4}}
  benign: {{source: builtin:benign-eval, limit: 4}}
  max_new_tokens: 4
{rest}
"""
MECHANISMS = """\
    replay: {share: 0.2, distill: 1.0}
    anchor: {limit: 8, tokens: 4}
    merge: {threshold: 0.5, scale: 0.5}"""
DIRECTION = """\
refusal_direction:
  harmful: {source: builtin:harmful-eval, split: test, limit: 8, fields: {instruction: prompt}}
  harmless: {source: builtin:benign-eval, split: test, limit: 8, fields: {instruction: prompt}}"""


def _write(tmp_path, name, **kw):
    kw.setdefault("allocation", "magnitude")
    kw.setdefault("task_extra", "")
    kw.setdefault("rest", "")
    kw.setdefault("out", tmp_path / f"run-{name}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(BASE.format(**kw))
    return path, kw["out"]


def _train(path, *extra):
    proc = subprocess.run([sys.executable, "-m", "safecl", "train", str(path), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _B(run, stage):
    return load_file(next((run / "stages").glob(f"*-{stage}")) / "adapter" / "adapter_model.safetensors")


def _mask(run, stage):
    return load_file(next((run / "stages").glob(f"*-{stage}")) / "mask.safetensors")


@pytest.fixture(scope="module")
def mechanism_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mech")
    path, out = _write(tmp, "mech", allocation="safety-aware", task_extra=MECHANISMS, rest=DIRECTION)
    rc, so, se = _train(path)
    assert rc == 0, se[-2000:]
    return out, so


def test_every_mechanism_keeps_earlier_stages_and_records_its_cost(mechanism_run):
    out, stdout = mechanism_run
    safety_B, task_B = _B(out, "safety"), _B(out, "arithmetic")
    safety_mask, task_mask = _mask(out, "safety"), _mask(out, "arithmetic")
    for key, m in safety_mask.items():
        assert not (m & task_mask[key]).any()  # disjoint masks
        assert torch.equal(task_B[key][m], safety_B[key][m])  # safety entries bit-identical after merge
        assert not task_B[key][~(m | task_mask[key])].any()  # nothing outside the two masks
    m = json.loads((out / "stages" / "01-arithmetic" / "metrics.json").read_text())
    mech = m["mechanisms"]
    assert mech["replay"]["replay_rows"] == 4 and mech["replay"]["task_rows"] == 16  # 0.2 of 20
    assert m["data"]["kept"] == 16 and m["data"]["encoded"] + m["data"]["dropped_too_long"] == 20
    assert mech["anchor"]["anchors"] == 8 and mech["replay_distill"]["rows"] == 4
    assert mech["allocation"]["rule"] == "safety-aware" and m["calibration"]["allocation"] == "safety-aware"
    assert set(m["train"]["terms"]) == {"anchor_kl", "replay_distill"}
    for term in m["train"]["terms"].values():
        assert len(term["values"]) == 3 and term["seconds_per_step"] > 0 and 0 < term["share_of_stage_time"] < 1
    assert mech["merge"]["modules"] == 14 and "safety merge" in stdout
    assert (out / "stages" / "00-safety" / "refusal_direction.safetensors").is_file()
    sm = json.loads((out / "stages" / "00-safety" / "metrics.json").read_text())
    assert sm["refusal_direction"]["n_harmful"] == 8
    assert "mechanisms" not in sm  # the safety stage trains plainly


def test_direction_anchor_trains(tmp_path):
    path, out = _write(tmp_path, "dir", task_extra="    anchor: {limit: 8, loss: direction}", rest=DIRECTION)
    rc, _, se = _train(path)
    assert rc == 0, se[-2000:]
    m = json.loads((out / "stages" / "01-arithmetic" / "metrics.json").read_text())
    assert "anchor_direction" in m["train"]["terms"] and m["mechanisms"]["anchor"]["direction_layer"] >= 1


def test_mechanism_keys_are_refused_on_the_safety_stage_and_without_a_direction(tmp_path):
    path, _ = _write(tmp_path, "bad", task_extra="    anchor: {loss: direction}")
    rc, _, se = _train(path)
    assert rc == 2 and "refusal_direction" in se
    rc, _, se = _train(path, "stages.0.replay={share: 0.1}", "stages.1.anchor=null")
    assert rc == 2 and "apply to task stages" in se
    rc, _, se = _train(path, "stages.0.anchor={loss: kl}", "stages.1.anchor=null")  # no benign prompts named
    assert rc == 2 and "its own `prompts`" in se


def test_repair_fires_on_an_unmeetable_threshold_and_records_its_stages(tmp_path):
    phrases = json.dumps(list(string.ascii_letters + string.digits + string.punctuation))
    rest = (f"gate: {{max_over_refusal: 0.5, action: repair, repair: {{attempts: 2, steps: 2, density: 0.05}}}}")
    path, out = _write(tmp_path, "repair", rest=rest)
    text = path.read_text().replace("  max_new_tokens: 4", f"  max_new_tokens: 4\n  judge: {{phrases: {phrases}, "
                                    "mode: substring}\n  do_sample: true")
    path.write_text(text)
    rc, so, se = _train(path)
    assert rc == 3, se[-2000:]  # the judge calls everything a refusal: over-refusal 1.0 can never pass
    run = json.loads((out / "run.json").read_text())
    # the safety stage itself fails over-refusal, so its repairs come first
    names = [s["name"] for s in run["stages"]]
    assert names == ["safety", "safety.repair1", "safety.repair2"] and run["status"] == "halted"
    for entry in run["stages"][1:]:
        assert entry["kind"] == "safety" and entry["repair_of"] == "safety"
        m = json.loads((out / entry["dir"] / "metrics.json").read_text())
        assert m["kind"] == "safety" and m["mask"]["entries"] > 0 and m["gate"]["fired"]
    masks = [_mask(out, n) for n in names]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not any((masks[i][k] & masks[j][k]).any() for k in masks[i])
    rows = [r["stage"] for r in json.loads((out / "retention.json").read_text())["rows"]]
    assert rows == ["base", "safety", "safety.repair1", "safety.repair2"]
    assert "REPAIR 1/2" in so and "REPAIR 2/2" in so


def test_start_from_another_runs_safety_stage(tmp_path, mechanism_run):
    src, _ = mechanism_run
    path, out = _write(tmp_path, "from", allocation="safety-aware",
                       task_extra="    anchor: {limit: 8, tokens: 4, task_share: 0.5}", rest=DIRECTION)
    # with a probe the source did not have: the judged rows are still copied, the probe reference is measured
    rc, so, se = _train(path, "--from", f"{src}:safety", "retention.probe={every: 2, limit: 4}")
    assert rc == 0, se[-2000:]
    assert "starting from" in so and "'safety' trained" not in so  # adopted, not retrained
    assert "retention rows copied" in so
    assert json.loads((out / "stages" / "00-safety" / "refusal_probe.json").read_text())["n"] == 4
    assert all(torch.equal(a, b) for a, b in zip(_B(src, "safety").values(), _B(out, "safety").values()))
    run = json.loads((out / "run.json").read_text())
    assert run["started_from"]["stage"] == "safety" and run["stages"][0]["adopted_from"] == str(src)
    rows = json.loads((out / "retention.json").read_text())["rows"]
    src_rows = json.loads((src / "retention.json").read_text())["rows"]
    assert rows[:2] == src_rows[:2]  # base and safety rows carried over, not re-measured
    assert (out / "base_check.json").read_bytes() == (src / "base_check.json").read_bytes()
    assert not any((_mask(out, "safety")[k] & _mask(out, "arithmetic")[k]).any() for k in _mask(out, "safety"))
    chosen = json.loads((out / "stages" / "01-arithmetic" / "metrics.json").read_text())["mechanisms"]["anchor"]
    # half the 8 anchors nearest the arithmetic prompts, out of the safety stage's 16 rows
    assert chosen["selection"]["nearest"] == 4 and chosen["selection"]["candidates"] == 16 and chosen["prompts"] == 8
    # another task eval: the source's rows lack what this check scores, so they are measured again
    rc, so, se = _train(path, "--from", f"{src}:safety", "stages.1.eval.limit=3", f"output_dir={tmp_path / 'z'}")
    assert rc == 0, se[-2000:]
    assert "retention rows re-measured" in so
    assert len(json.loads((tmp_path / "z" / "retention.json").read_text())["rows"][0]["values"]["task:arithmetic"]) == 3
    # a run that differs where it must agree is refused, naming the key
    rc, _, se = _train(path, "--from", f"{src}:safety", "adapter.rank=8", f"output_dir={tmp_path / 'x'}")
    assert rc == 2 and "adapter.rank" in se
    rc, _, se = _train(path, "--from", f"{src}:nope", f"output_dir={tmp_path / 'y'}")
    assert rc == 2 and "not a finished stage" in se
