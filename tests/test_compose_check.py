"""safecl compose (any subset of a run's stages as one adapter) and safecl check (the retention
check on any model + PEFT LoRA adapter), on real tiny runs of the smoke recipe."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from safecl.adapters.compact import bits_equal, load_compact
from safecl.adapters.compose import compose, read_run
from safecl.adapters.export import load_mask, module_name, peft_key
from safecl.cli import main
from safecl.errors import SafeclError
from safecl.evaluation.answers import read_answers
from tests.conftest import SMOKE

# Small, fast runs. lr 0.5 makes the adapter change the tiny model's responses (at the smoke
# lr they stay blank), and a judge phrase that its byte-level output contains (U+FFFD) makes the
# refusal score nonzero, so equal numbers in the check tests are not equal by accident.
OVERRIDES = ["train.max_steps=3", "train.lr=0.5", "retention.harmful.limit=4", "retention.benign.limit=4",
             "stages.1.eval.limit=2", "stages.2.eval.limit=2", "tracking.enabled=false",
             'retention.judge={phrases: ["\\ufffd"], mode: substring}']
STAGES = ["00-safety", "01-arithmetic", "02-sentiment"]


def _run(tmp, name, *extra):
    from safecl.recipe import load_recipe
    from safecl.training.runner import run_recipe

    recipe = load_recipe(SMOKE, [*OVERRIDES, f"output_dir={tmp / name}", *extra])
    return run_recipe(recipe, SMOKE, echo=lambda *_: None).output_dir


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Three smoke runs, once per session: lori-s (retention checked), lori-d and lora (no checks)."""
    tmp = tmp_path_factory.mktemp("compose")
    return {
        "lori-s": _run(tmp, "lori-s"),
        "lori-d": _run(tmp, "lori-d", "adapter.method=lori-d", "retention.enabled=false"),
        "lora": _run(tmp, "lora", "adapter.method=lora", "retention.enabled=false", "train.max_steps=1",
                     "train.lr=1e-3"),
    }


def tensors(d):
    return load_file(d / "adapter_model.safetensors")


def stage_tensors(run, stage):
    return tensors(run / "stages" / stage / "adapter")


def assert_bits(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert bits_equal(got[k], want[k]), k


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def b_of(t):
    return {module_name(k): v for k, v in t.items() if k.endswith(".lora_B.weight")}


# -- compose: lori-s -------------------------------------------------------------------------

def test_all_stages_equal_the_final_adapter_bit_for_bit(runs, tmp_path, capsys):
    run = runs["lori-s"]
    code, out, _ = cli(capsys, "compose", run, "--stages", "safety,arithmetic,sentiment", "--out", tmp_path / "all")
    assert code == 0, out
    assert "bit for bit" in out and "left out: none" in out
    assert_bits(tensors(tmp_path / "all"), stage_tensors(run, STAGES[-1]))
    compose(run, ["all"], tmp_path / "all2")
    assert_bits(tensors(tmp_path / "all2"), stage_tensors(run, STAGES[-1]))
    assert any(v.abs().max() > 0 for v in b_of(tensors(tmp_path / "all")).values())


def test_a_prefix_of_stages_is_that_stages_adapter(runs, tmp_path):
    run = runs["lori-s"]
    compose(run, ["safety"], tmp_path / "s")
    assert_bits(tensors(tmp_path / "s"), stage_tensors(run, "00-safety"))
    compose(run, ["arithmetic", "safety"], tmp_path / "sa")  # order given does not matter
    assert_bits(tensors(tmp_path / "sa"), stage_tensors(run, "01-arithmetic"))


def test_two_stages_are_the_sum_of_their_parts(runs, tmp_path):
    run = runs["lori-s"]
    final = b_of(stage_tensors(run, STAGES[-1]))
    masks = {s: load_mask(run / "stages" / s / "mask.safetensors") for s in STAGES}
    part = {s: {n: torch.where(masks[s][n], final[n], torch.zeros_like(final[n])) for n in final} for s in STAGES}
    compose(run, ["safety", "sentiment"], tmp_path / "ss")
    got = tensors(tmp_path / "ss")
    for n in final:
        want = part["00-safety"][n] + part["02-sentiment"][n]
        assert bits_equal(got[peft_key(n, "B")], want), n
        assert not got[peft_key(n, "B")][masks["01-arithmetic"][n]].any()  # arithmetic's entries are gone
        assert bits_equal(got[peft_key(n, "A")], stage_tensors(run, STAGES[-1])[peft_key(n, "A")])
    assert any((part["01-arithmetic"][n] != 0).any() for n in final)  # something was actually removed


def test_output_loads_in_peft_and_carries_provenance(runs, tmp_path):
    import hashlib

    from peft import PeftModel

    from safecl.models import load_model_and_tokenizer
    from safecl.recipe import load_recipe

    run = runs["lori-s"]
    out, prov = compose(run, ["safety", "sentiment"], tmp_path / "ss")
    on_disk = json.loads((out / "provenance.json").read_text())
    assert on_disk == prov
    assert [s["name"] for s in prov["stages"]] == ["safety", "sentiment"] and prov["left_out"] == ["arithmetic"]
    assert prov["method"] == "lori-s" and prov["safecl_version"] and prov["run_dir"] == str(run.resolve())
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert prov["sources_sha256"]["stages/02-sentiment/adapter/adapter_model.safetensors"] == \
        sha(run / "stages/02-sentiment/adapter/adapter_model.safetensors")
    assert set(prov["sources_sha256"]) >= {"run.json", *(f"stages/{s}/mask.safetensors" for s in STAGES)}
    assert prov["output_sha256"]["adapter_model.safetensors"] == sha(out / "adapter_model.safetensors")
    model, _ = load_model_and_tokenizer(load_recipe(SMOKE, OVERRIDES).model)
    PeftModel.from_pretrained(model, str(out))  # vanilla PEFT loads it


def test_compact_output_expands_to_the_same_adapter(runs, tmp_path, capsys):
    run = runs["lori-s"]
    compose(run, ["safety", "sentiment"], tmp_path / "peft")
    code, out, _ = cli(capsys, "compose", run, "--stages", "safety,sentiment", "--out", tmp_path / "c", "--compact")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["lori-compact.safetensors", "provenance.json"]
    assert_bits(load_compact(tmp_path / "c" / "lori-compact.safetensors"), tensors(tmp_path / "peft"))


# -- compose: lori-d, lora -------------------------------------------------------------------

def test_lori_d_parts_are_differences_of_cumulative_adapters(runs, tmp_path, capsys):
    run = runs["lori-d"]
    compose(run, ["all"], tmp_path / "all")
    assert_bits(tensors(tmp_path / "all"), stage_tensors(run, STAGES[-1]))
    compose(run, ["safety"], tmp_path / "s")
    assert_bits(tensors(tmp_path / "s"), stage_tensors(run, "00-safety"))
    compose(run, ["safety", "sentiment"], tmp_path / "ss")
    B = [b_of(stage_tensors(run, s)) for s in STAGES]
    got = b_of(tensors(tmp_path / "ss"))
    for n in got:
        want = B[0][n].double() + (B[2][n].double() - B[1][n].double())
        torch.testing.assert_close(got[n].double(), want, rtol=0, atol=1e-6)
    assert any(not torch.equal(got[n], B[2][n]) for n in got)
    code, _, err = cli(capsys, "compose", run, "--stages", "safety", "--out", tmp_path / "c", "--compact")
    assert code == 2 and "lori-s" in err and "dense" in err


def test_a_lora_run_is_refused(runs, tmp_path, capsys):
    code, _, err = cli(capsys, "compose", runs["lora"], "--stages", "safety", "--out", tmp_path / "x")
    assert code == 2
    assert "lora" in err and "A trains in every stage" in err and "separable" in err
    assert not (tmp_path / "x").exists()


# -- compose: rolled-back and repair stages (run directories edited the way the runner writes them)

def test_rolled_back_stage_cannot_be_composed(runs, tmp_path, capsys):
    run = shutil.copytree(runs["lori-s"], tmp_path / "rb")
    sdir = run / "stages" / "02-sentiment"  # as a rollback leaves it: previous adapter, mask kept as a record
    shutil.rmtree(sdir / "adapter")
    shutil.copytree(run / "stages" / "01-arithmetic" / "adapter", sdir / "adapter")
    (sdir / "mask.safetensors").rename(sdir / "mask.rolled_back.safetensors")
    info = json.loads((run / "run.json").read_text())
    info["stages"][2]["rolled_back"] = True
    (run / "run.json").write_text(json.dumps(info))
    code, _, err = cli(capsys, "compose", run, "--stages", "safety,sentiment", "--out", tmp_path / "x")
    assert code == 2 and "'sentiment' was rolled back" in err and "sentiment (rolled back)" in err
    compose(run, ["all"], tmp_path / "all")
    assert_bits(tensors(tmp_path / "all"), stage_tensors(run, "01-arithmetic"))
    _, prov = compose(run, ["safety"], tmp_path / "s")
    assert prov["rolled_back"] == ["sentiment"] and prov["left_out"] == ["arithmetic"]


def test_repair_stage_is_composable_by_its_name(runs, tmp_path):
    run = shutil.copytree(runs["lori-s"], tmp_path / "rp")
    (run / "stages" / "02-sentiment").rename(run / "stages" / "01-arithmetic.repair1")
    info = json.loads((run / "run.json").read_text())
    info["stages"][2].update(name="arithmetic.repair1", index=1, dir="stages/01-arithmetic.repair1",
                             repair_of="arithmetic", kind="safety")
    (run / "run.json").write_text(json.dumps(info))
    assert [e.label() for e in read_run(run).entries] == ["safety", "arithmetic",
                                                          "arithmetic.repair1 (repair of arithmetic)"]
    _, prov = compose(run, ["safety", "arithmetic.repair1"], tmp_path / "x")
    assert prov["left_out"] == ["arithmetic"] and prov["stages"][1]["repair_of"] == "arithmetic"
    final = b_of(stage_tensors(runs["lori-s"], STAGES[-1]))
    keep = {n: load_mask(run / "stages/00-safety/mask.safetensors")[n]
            | load_mask(run / "stages/01-arithmetic.repair1/mask.safetensors")[n] for n in final}
    got = b_of(tensors(tmp_path / "x"))
    assert all(bits_equal(got[n], torch.where(keep[n], final[n], torch.zeros_like(final[n]))) for n in final)


def test_unknown_stage_lists_the_runs_stages(runs, tmp_path, capsys):
    code, _, err = cli(capsys, "compose", runs["lori-s"], "--stages", "safety,code", "--out", tmp_path / "x")
    assert code == 2
    assert "unknown stage 'code'" in err and "safety, arithmetic, sentiment" in err


def test_compose_bad_input(runs, tmp_path, capsys):
    code, _, err = cli(capsys, "compose", tmp_path / "nope", "--stages", "safety", "--out", tmp_path / "x")
    assert code == 2 and "no such run directory" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "compose", runs["lori-s"], "--stages", "safety", "--out", tmp_path / "full")
    assert code == 2 and "not a compose output" in err and (tmp_path / "full" / "keep.txt").is_file()
    with pytest.raises(SafeclError, match="inside the run's stages"):
        compose(runs["lori-s"], ["safety"], runs["lori-s"] / "stages" / "00-safety" / "adapter")


# -- check -----------------------------------------------------------------------------------

def peft_copy(run, out, stage=STAGES[-1], model_overrides=()):
    """An adapter made with plain peft.get_peft_model on the tiny model, weights set to a safecl adapter's."""
    from peft import LoraConfig, get_peft_model

    from safecl.models import load_model_and_tokenizer
    from safecl.recipe import load_recipe

    recipe = load_recipe(SMOKE, [*OVERRIDES, *model_overrides])
    model, _ = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
    a = recipe.adapter
    pm = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=a.target_modules))
    if stage is not None:
        src = stage_tensors(run, stage)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if ".lora_" in name:
                    p.copy_(src[name.replace(".default.", ".")])
    pm.save_pretrained(str(out))
    return out


def test_check_of_a_plain_peft_adapter_matches_the_runs_own_check(runs, tmp_path, capsys):
    run = runs["lori-s"]
    adapter = peft_copy(run, tmp_path / "peft")
    code, out, _ = cli(capsys, "check", "builtin:tiny-llama", "--adapter", adapter, "--recipe", SMOKE, *OVERRIDES,
                       "--json", "--answers", tmp_path / "answers.jsonl")
    assert code == 0
    doc = json.loads(out)
    # --answers: every answer, as the run's own answers file of that stage has them
    keys = ("check", "i", "prompt", "response", "verdict")
    mine = [tuple(r[k] for k in keys) for r in read_answers(tmp_path / "answers.jsonl")]
    theirs = [tuple(r[k] for k in keys) for r in read_answers(run / "stages" / STAGES[-1] / "answers.jsonl")]
    generated = [e for e in doc["check"]["evals"] if not e["name"].startswith("nll:")]
    assert mine == theirs and len(mine) == sum(e["n"] for e in generated)
    row = json.loads((run / "retention.json").read_text())["rows"][-1]
    assert row["stage"] == "sentiment"
    assert {e["name"]: e["score"] for e in generated} == {k: v for k, v in row["scores"].items()
                                                           if not k.startswith("nll:")}
    assert {e["name"]: e["score"] for e in doc["check"]["evals"] if e["name"].startswith("nll:")} == pytest.approx(
        {k: v for k, v in row["scores"].items() if k.startswith("nll:")}, abs=1e-4)
    assert doc["check"]["evals"][0]["score"] > 0  # the judge phrase is found: not equal by accident
    in_run = json.loads((run / "stages" / STAGES[-1] / "metrics.json").read_text())["retention"]
    for mine, theirs in zip(doc["check"]["evals"], in_run["evals"]):
        assert mine["name"] == theirs["name"] and mine["n"] == theirs["n"] and mine["ci"] == theirs["ci"]
        assert [s["response"] for s in mine["samples"]] == [s["response"] for s in theirs["samples"]]
        assert mine["measured_by"] == theirs["measured_by"]
    assert doc["judge"]["kind"] == "keyword" and doc["tasks"] == ["arithmetic", "sentiment"]


def test_check_a_composed_adapter_with_baseline_and_report(runs, tmp_path, capsys):
    run = runs["lori-s"]
    compose(run, ["safety"], tmp_path / "s")
    code, out, _ = cli(capsys, "check", "builtin:tiny-llama", "--adapter", tmp_path / "s", "--recipe", SMOKE,
                       *OVERRIDES, "--baseline", "--report", tmp_path / "rep")
    assert code == 0, out
    rows = {r["stage"]: r["scores"] for r in json.loads((run / "retention.json").read_text())["rows"]}
    doc = json.loads((tmp_path / "rep" / "check.json").read_text())
    mine = {e["name"]: e["score"] for e in doc["check"]["evals"]}
    base = {e["name"]: e["score"] for e in doc["baseline"]["evals"]}
    for col in ("refusal", "over_refusal"):  # {safety} = the safety stage's adapter; bare = the base row
        assert mine[col] == rows["safety"][col] and base[col] == rows["base"][col]
    if base["refusal"] > 0:
        assert doc["safety_retention"] == pytest.approx(mine["refusal"] / base["refusal"])
    assert "safety retention = refusal(model + adapter) / refusal(bare model)" in out
    assert "refusal" in out and "bare model" in out and "95% CI" in out
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "over_refusal" in page and "<script" not in page


def test_check_bad_input(runs, tmp_path, capsys):
    from peft import IA3Config, get_peft_model

    from safecl.models import load_model_and_tokenizer
    from safecl.recipe.schema import ModelConfig

    # an adapter for another shape of the model
    small = peft_copy(runs["lori-s"], tmp_path / "small", stage=None,
                      model_overrides=["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"])
    code, _, err = cli(capsys, "check", "builtin:tiny-llama", "--adapter", small)
    assert code == 2 and "(out x in)" in err and "another base model" in err
    # an adapter for another model: its modules are not in this one
    other = shutil.copytree(small, tmp_path / "other")
    t = load_file(other / "adapter_model.safetensors")
    save_file({k.replace("model.layers.", "transformer.h."): v for k, v in t.items()},
              other / "adapter_model.safetensors")
    code, _, err = cli(capsys, "check", "builtin:tiny-llama", "--adapter", other)
    assert code == 2 and "transformer.h.0" in err and "not a linear layer" in err
    # a non-LoRA adapter
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"))
    get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])) \
        .save_pretrained(str(tmp_path / "ia3"))
    code, _, err = cli(capsys, "check", "builtin:tiny-llama", "--adapter", tmp_path / "ia3")
    assert code == 2 and "'IA3' is not LORA" in err
    # a model path that does not exist; an adapter directory that does not exist
    code, _, err = cli(capsys, "check", tmp_path / "no-model", "--adapter", small)
    assert code == 2 and "no such directory" in err and "no-model" in err
    code, _, err = cli(capsys, "check", "builtin:tiny-llama", "--adapter", tmp_path / "no-adapter")
    assert code == 2 and "no-adapter: no such directory" in err
    code, _, err = cli(capsys, "check", "builtin:tiny-llama", "--baseline")
    assert code == 2 and "give --adapter" in err
