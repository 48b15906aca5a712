"""The refusal probe: the direction is a difference of means; probe retention is 0 for the base
model and 1 after the safety stage by construction; the mid-stage gate stops (or rolls back) at
the first probed step under its threshold."""

import json

import pytest
import torch
from safetensors.torch import load_file

from safecl.adapters import adapters_off, inject_adapters
from safecl.cli import main
from safecl.data.sources import load_examples
from safecl.models import load_model_and_tokenizer
from safecl.recipe import load_recipe
from safecl.safety.direction import load_direction, refusal_direction
from safecl.safety.probe import PROBE_FILE, load_reference, probe_retention, probe_score
from safecl.training.checkpoint import load_stage_adapter
from tests.conftest import SMOKE, train_smoke

DIRECTION = ("refusal_direction={harmful: {source: 'builtin:safety', where: {kind: harmful}, limit: 12}, "
             "harmless: {source: 'builtin:safety', where: {kind: benign}, limit: 12}}")
FAST = ["train.max_steps=6", "adapter.calibration_steps=1", "retention.harmful.limit=4", "retention.benign.limit=4",
        "retention.max_new_tokens=4", "stages.1.eval.limit=4", "stages.2.eval.limit=4", DIRECTION,
        "retention.probe={kind: direction, every: 1, limit: 8}"]


@pytest.fixture(scope="module")
def watched_free(tmp_path_factory):
    return train_smoke(tmp_path_factory, "probe", FAST)


def _model_with_adapters(out):
    recipe = load_recipe(SMOKE, [f"output_dir={out}", *FAST])
    model, tok = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
    a = recipe.adapter
    layers = inject_adapters(model, a.target_modules, a.rank, a.alpha, recipe.adapter_seed, train_A=False)
    return recipe, model.eval(), tok, layers


def test_direction_is_the_difference_of_means_by_hand(watched_free):
    recipe, model, tok, layers = _model_with_adapters(watched_free)
    load_stage_adapter(layers, watched_free / "stages" / "00-safety" / "adapter")
    harm, _ = load_examples(recipe.refusal_direction.harmful, SMOKE.parent, seed=recipe.seed, need_response=False)
    safe, _ = load_examples(recipe.refusal_direction.harmless, SMOKE.parent, seed=recipe.seed, need_response=False)

    def states(examples):  # one prompt at a time, no padding: h_l at the last token
        rows = []
        for e in examples:
            text = tok.apply_chat_template(e.prompt_messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, -1].float() for h in hs]))
        return torch.stack(rows, dim=1)

    by_hand = states(harm).mean(1) - states(safe).mean(1)
    stored = load_direction(watched_free / "stages" / "00-safety" / "refusal_direction.safetensors")
    assert torch.allclose(stored["direction"], by_hand, atol=1e-4, rtol=1e-4)
    computed = refusal_direction(model, tok, [e.prompt_messages for e in harm], [e.prompt_messages for e in safe])
    assert torch.allclose(computed["direction"], stored["direction"], atol=1e-5)


def test_probe_retention_is_0_for_base_and_1_after_safety(watched_free):
    recipe, model, tok, layers = _model_with_adapters(watched_free)
    sdir = watched_free / "stages" / "00-safety"
    ref, direction = load_reference(sdir / PROBE_FILE), load_direction(sdir / "refusal_direction.safetensors")
    harm, _ = load_examples(recipe.refusal_direction.harmful, SMOKE.parent, seed=recipe.seed, need_response=False)
    prompts = [e.prompt_messages for e in harm[:8]]
    r = direction["direction"][ref["layer"]]
    load_stage_adapter(layers, sdir / "adapter")
    assert probe_retention(probe_score(model, tok, prompts, ref["layer"], r), ref) == pytest.approx(1.0, abs=1e-5)
    with adapters_off(layers):
        assert probe_retention(probe_score(model, tok, prompts, ref["layer"], r), ref) == pytest.approx(0.0, abs=1e-5)
    # every task stage starts where the one before ended: its step-0 point is the previous stage's last
    p1 = json.loads((watched_free / "stages" / "01-arithmetic" / "metrics.json").read_text())["probe"]
    p2 = json.loads((watched_free / "stages" / "02-sentiment" / "metrics.json").read_text())["probe"]
    assert [p[0] for p in p1["points"]] == list(range(7)) and p1["probes"] == 7
    assert p2["points"][0][1] == pytest.approx(p1["points"][-1][1], abs=1e-5)
    # ... so step 0 is not probed again: the first task stage takes the post-safety reading (1 by
    # construction), the next one its predecessor's last reading, both on the same adapter bit for bit
    assert p1["points"][0][1] == 1.0 and p1["measured"] == 6
    assert p2["points"][0][1] == p1["points"][-1][1] and p2["measured"] == p2["probes"] - 1
    assert p1["seconds"] > 0 and 0 < p1["share_of_stage_time"]


@pytest.mark.parametrize("action", ["halt", "rollback"])
def test_the_watch_acts_at_the_first_probe_under_the_threshold(action, watched_free, tmp_path, capsys):
    free = json.loads((watched_free / "stages" / "01-arithmetic" / "metrics.json").read_text())["probe"]["points"]
    values = [v for _, v in free[1:]]
    threshold = sorted(values)[len(values) // 2]  # some probed step falls below it
    stop = next(s for s, v in free[1:] if v < threshold)
    good = max([0] + [s for s, v in free[1:stop] if v >= threshold])
    out = tmp_path / action
    rc = main(["train", str(SMOKE), f"output_dir={out}", *FAST, "gate.watch=probe", "gate.watch_untracked=true",
               f"gate.min_probe_retention={threshold!r}", f"gate.watch_action={action}"])
    info = json.loads((out / "run.json").read_text())
    m = json.loads((out / "stages" / "01-arithmetic" / "metrics.json").read_text())
    assert m["train"]["stopped_at"] == stop and m["train"]["steps"] == stop
    assert m["probe"]["points"] == free[: stop + 1]  # watching changes nothing before it acts
    watch = next(e for e in info["stages"] if e["name"] == "arithmetic")["watch"]
    assert watch["step"] == stop and watch["action"] == action
    if action == "halt":
        assert rc == 3 and info["status"] == "halted" and info["halted_at"] == "arithmetic"
        assert f"at step {stop}" in capsys.readouterr().err
    else:
        assert rc == 0 and watch["restored_step"] == good
        if good == 0:  # restored to the stage start: the stage added nothing
            before = load_file(out / "stages" / "00-safety" / "adapter" / "adapter_model.safetensors")
            after = load_file(out / "stages" / "01-arithmetic" / "adapter" / "adapter_model.safetensors")
            assert all(torch.equal(before[k], after[k]) for k in before)


def test_probe_needs_a_refusal_direction(tmp_path, capsys):
    assert main(["train", str(SMOKE), f"output_dir={tmp_path / 'x'}", "retention.probe={every: 2}",
                 "--dry-run"]) == 2
    assert "retention.probe needs the `refusal_direction` section" in capsys.readouterr().err


def test_audit_carries_the_probe_curve_and_the_report_draws_it(watched_free, tmp_path, capsys):
    assert main(["audit", str(watched_free), "--json", f"--report={tmp_path / 'rep'}"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    curve = run["probe"]
    assert [p["stage"] for p in curve] == ["arithmetic"] * 7 + ["sentiment"] * 7
    assert [p["global_step"] for p in curve] == list(range(6, 13)) + list(range(12, 19))  # safety: 6 steps
    assert (tmp_path / "rep" / "probe.png").stat().st_size > 1000
    assert "Refusal probe during training" in (tmp_path / "rep" / "report.html").read_text()


def test_correlation_benchmark_math_against_hand_values():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("probe_correlation", ROOT / "benchmarks" / "probe_correlation.py")
    pc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc)
    assert pc.ranks([3.0, 1.0, 1.0, 2.0]) == [4.0, 1.5, 1.5, 3.0]  # ties share the mean rank
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) without ties: one swapped pair of 4 -> 1 - 6 * 2 / 60 = 0.8
    assert abs(pc.spearman([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12
    assert abs(pc.spearman([1, 2, 3], [30, 20, 10]) + 1.0) < 1e-12
    assert abs(pc.pearson([1, 2, 3], [2, 4, 7]) - 0.9933992677987828) < 1e-12
    lo, hi = pc.bootstrap_rho([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 6, 5], reps=200)
    assert -1.0 <= lo <= 0.943 <= hi <= 1.0


def test_step_0_reuses_a_reading_only_on_the_same_adapter_bit_for_bit():
    """ProbeMonitor(start=(fingerprint, reading)): step 0 takes the reading when the adapter's
    fingerprint matches, and measures when a single B entry differs."""
    from safecl.adapters.layer import LoRILinear
    from safecl.safety.probe import ProbeMonitor, adapter_fingerprint

    base = torch.nn.Linear(6, 4)
    layers = {"m": LoRILinear(base, "m", rank=2, alpha=4, seed=0)}
    with torch.no_grad():
        layers["m"].B_frozen.normal_()

    class Counting:  # the probe interface: score(model) -> s(M); counts its calls
        calls = 0

        def score(self, model):
            Counting.calls += 1
            return 0.5

    ref = {"base": 0.0, "safety": 1.0}
    fp = adapter_fingerprint(layers)
    monitor = ProbeMonitor(Counting(), layers, ref, every=2, start=(fp, 0.9))
    monitor(None, 0, False)
    assert monitor.points == [[0, 0.9]] and Counting.calls == 0 and monitor.measured == 0
    monitor(None, 2, True)
    assert monitor.points[-1] == [2, 0.5] and monitor.end == (fp, 0.5) and monitor.measured == 1
    with torch.no_grad():
        layers["m"].B_frozen[0, 0] += 1e-6
    other = ProbeMonitor(Counting(), layers, ref, every=2, start=(fp, 0.9))
    other(None, 0, False)
    assert other.points == [[0, 0.5]] and Counting.calls == 2
