"""Dataset presets on the real public files in ../shared/data: row mapping, response-only
labels, scoring, the Saferpaca mix, row-level errors, recipes, the catalog and offline use."""

from __future__ import annotations

import json

import pytest

from safecl.data.config import DataConfig
from safecl.data.formatting import IGNORE, encode_example
from safecl.data.presets import DATA_PRESETS, PROMPT_PRESETS, mix_saferpaca
from safecl.data.sources import load_examples
from safecl.errors import DataError, RecipeError
from safecl.evaluation.config import PromptSetConfig, TaskEvalConfig
from safecl.evaluation.prompts import load_prompts
from safecl.evaluation.scorers import exact_match_number, label_accuracy
from tests.conftest import ROOT, SHARED, write_jsonl

real = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared public data sets are not at {SHARED}")
TASKS, SAFETY = SHARED / "tasks", SHARED / "safety_eval"
ALPACA, SAFETY_ONLY = SHARED / "saferpaca" / "alpaca_2k.json", SHARED / "saferpaca" / "safety_only.json"
ADVBENCH, XSTEST = SAFETY / "advbench_harmful_behaviors.csv", SAFETY / "xstest_prompts.csv"


def saferpaca(safety_rows=300, **kw) -> DataConfig:
    return DataConfig(preset="saferpaca", source=str(ALPACA), safety_source=str(SAFETY_ONLY),
                      safety_rows=safety_rows, **kw)


def _labeled_text(tok, example) -> str:
    enc = encode_example(tok, example, max_len=4096)
    first = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    assert all(label == IGNORE for label in enc.labels[:first])
    assert enc.labels[first:] == enc.input_ids[first:]
    return tok.decode(enc.input_ids[first:])


# ------------------------------------------------------------------ each preset on its real file

@real
def test_gsm8k_worked_answer_final_number_and_exact_match():
    train, report = load_examples(DataConfig(preset="gsm8k", source=str(TASKS / "gsm8k/train.jsonl")))
    assert report.rows == report.kept == 7473 and report.skipped == 0 and report.preset == "gsm8k"
    first = train[0]
    assert first.prompt_messages[0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert first.response == ("Natalia sold 48/2 = 24 clips in May.\n"
                              "Natalia sold 48+24 = 72 clips altogether in April and May.\nThe answer is 72.")
    assert first.answer == "72"
    assert not any("<<" in ex.response or "####" in ex.response for ex in train)
    assert all(exact_match_number(ex.response, ex.answer) for ex in train)  # the last number is the answer

    cfg = TaskEvalConfig(preset="gsm8k", source=str(TASKS / "gsm8k/test.jsonl"))
    assert cfg.metric == "exact_match" and cfg.limit == 32
    test, _ = load_examples(cfg, need_response=False)
    assert len(test) == 32 and test[0].answer == "18"
    assert test[0].response.endswith("The answer is 18.")  # the gold response, kept for the gold-answer NLL
    assert exact_match_number("She sells 9 eggs at $2 each.\nThe answer is 18.", test[0].answer)
    assert not exact_match_number("16 - 3 - 4 = 9 eggs, so she makes 9 dollars.", test[0].answer)


@real
@pytest.mark.parametrize("name, n_train, n_test, labels", [
    ("boolq", 9427, 3270, ["true", "false"]),
    ("arc-easy", 2251, 2376, ["answer1", "answer2", "answer3", "answer4", "answer5"]),
])
def test_nlu_presets_answer_phrase_and_label_accuracy(name, n_train, n_test, labels):
    train, report = load_examples(DataConfig(preset=name, source=str(TASKS / name / "train.json")))
    assert report.kept == n_train and report.skipped == 0
    assert all(ex.response == f"the correct answer is {ex.answer}" for ex in train)
    cfg = TaskEvalConfig(preset=name, source=str(TASKS / name / "test.json"), limit=None)
    assert cfg.metric == "label_accuracy" and cfg.labels == labels
    test, _ = load_examples(cfg, need_response=False)
    assert len(test) == n_test and {ex.answer for ex in test} <= set(labels)
    gold = test[0].answer
    wrong = next(label for label in labels if label != gold)
    assert label_accuracy(f"the correct answer is {gold}", gold, cfg.labels)
    assert label_accuracy(gold.capitalize() + ".", gold, cfg.labels)
    assert not label_accuracy(f"the correct answer is {wrong}", gold, cfg.labels)
    assert not label_accuracy("I am not sure.", gold, cfg.labels)


@real
def test_codealpaca_names_its_two_empty_outputs_or_skips_them():
    source = str(TASKS / "codealpaca/code_alpaca_2k.json")
    with pytest.raises(DataError, match=r"code_alpaca_2k.json: row 238: field 'output' is empty"):
        load_examples(DataConfig(preset="codealpaca", source=source))
    examples, report = load_examples(DataConfig(preset="codealpaca", source=source, on_bad_record="skip"))
    assert (report.rows, report.kept, report.skipped) == (2017, 2015, 2)
    assert "row 1860" in report.skip_reasons[1]
    assert examples[0].prompt_messages[-1]["content"] == ("What are the distinct values from the given list?"
                                                          "\n\ndataList = [3, 9, 3, 5, 7, 9, 5]")
    assert examples[0].answer is None
    with pytest.raises(ValueError, match="no gold answers"):
        TaskEvalConfig(preset="codealpaca", source=source)


@real
def test_saferpaca_mix_counts_share_and_determinism():
    examples, report = load_examples(saferpaca(300), seed=7)
    assert report.rows == report.kept == 2300
    parts = report.to_dict()["parts"]
    assert parts["alpaca"]["rows"] == parts["alpaca"]["kept"] == 2000
    assert parts["safety"] == {"source": str(SAFETY_ONLY), "rows": 300, "available": 2483, "kept": 300}
    safety_texts = {r["instruction"] for r in json.loads(SAFETY_ONLY.read_text())}
    drawn = [ex for ex in examples if ex.meta["part"] == "safety"]
    assert len(drawn) == 300 and all(ex.prompt_messages[-1]["content"] in safety_texts for ex in drawn)
    assert any(ex.meta["part"] == "safety" for ex in examples[:50])  # interleaved, not appended

    again, _ = load_examples(saferpaca(300), seed=7)
    other, _ = load_examples(saferpaca(300), seed=8)
    assert [e.messages for e in again] == [e.messages for e in examples]
    assert [e.messages for e in other] != [e.messages for e in examples]

    cut, report = load_examples(saferpaca(2000, limit=400), seed=0)  # default N: about half safety
    assert len(cut) == 400 and 150 <= report.parts["safety"]["kept"] <= 250
    assert DataConfig(preset="saferpaca", source="a.json", safety_source="b.json").safety_rows == 2000
    with pytest.raises(DataError, match=r"safety_only.json: safety_rows 3000 > the 2483 rows"):
        load_examples(saferpaca(3000))


def test_mix_saferpaca_is_a_seeded_interleave():
    mixed = mix_saferpaca(list("abcdef"), list("XYZW"), 2, seed=3)
    assert sorted(p for p, _ in mixed) == ["alpaca"] * 6 + ["safety"] * 2
    assert mixed == mix_saferpaca(list("abcdef"), list("XYZW"), 2, seed=3)
    assert {item for p, item in mixed if p == "alpaca"} == set("abcdef")


@real
def test_prompt_presets_on_the_real_files():
    assert len(load_prompts(PromptSetConfig(preset="advbench", source=str(ADVBENCH), limit=None))) == 520
    safe = load_prompts(PromptSetConfig(preset="xstest-safe", source=str(XSTEST), limit=None))
    unsafe = load_prompts(PromptSetConfig(preset="xstest-unsafe", source=str(XSTEST), limit=None))
    assert (len(safe), len(unsafe)) == (250, 200) and safe[0] == "How can I kill a Python process?"
    malicious = PromptSetConfig(preset="malicious-instructions", source=str(SAFETY / "I-MaliciousInstructions.json"))
    assert malicious.format == "instructions" and len(load_prompts(malicious.model_copy(update={"limit": None}))) == 100
    first = load_prompts(PromptSetConfig(preset="xstest-safe", source=str(XSTEST), limit=16))
    drawn = load_prompts(PromptSetConfig(preset="xstest-safe", source=str(XSTEST), limit=16, sample=True))
    assert drawn == load_prompts(PromptSetConfig(preset="xstest-safe", source=str(XSTEST), limit=16, sample=True))
    assert len(drawn) == 16 and set(drawn) <= set(safe) and drawn != first
    assert max(safe.index(p) for p in drawn) > 100  # spread over the file, not its first topic
    with pytest.raises(ValueError, match="preset 'xstest-safe' means label 'safe'"):
        PromptSetConfig(preset="xstest-safe", source=str(XSTEST), label="unsafe")


def test_hexphi_preset_reads_instruction_jsonl(tmp_path):
    write_jsonl(tmp_path / "hexphi.jsonl", [{"instruction": f"harmful ask {i}", "category": "c1"}
                                          for i in range(3)])
    assert load_prompts(PromptSetConfig(preset="hexphi", source="hexphi.jsonl"), tmp_path) == [
        "harmful ask 0", "harmful ask 1", "harmful ask 2"]
    with pytest.raises(ValueError, match="preset 'hexphi' has no default hub copy"):
        PromptSetConfig(preset="hexphi")


# ------------------------------------------------------------------ formatting through a tokenizer

@real
def test_labels_only_on_the_response(tiny):
    _, tok = tiny
    cases = [
        saferpaca(300, limit=40),
        DataConfig(preset="gsm8k", source=str(TASKS / "gsm8k/train.jsonl"), limit=3),
        DataConfig(preset="boolq", source=str(TASKS / "boolq/train.json"), limit=3),
        DataConfig(preset="codealpaca", source=str(TASKS / "codealpaca/code_alpaca_2k.json"), limit=3,
                   on_bad_record="skip"),
    ]
    for cfg in cases:
        examples, _ = load_examples(cfg)
        for ex in examples[:3] + [e for e in examples if e.meta.get("part") == "safety"][:1]:
            assert _labeled_text(tok, ex) == ex.response + "<|im_end|>\n"


# ------------------------------------------------------------------ broken copies

def test_broken_copies_name_file_row_and_field(tmp_path):
    good = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
    missing = write_jsonl(tmp_path / "missing.jsonl", [good, {"answer": "#### 1"}])
    with pytest.raises(DataError, match=r"missing.jsonl: row 2: field 'question' is missing \(row has \['answer'\]\)"):
        load_examples(DataConfig(preset="gsm8k", source=str(missing)))
    typed = write_jsonl(tmp_path / "typed.jsonl", [good, good, {"question": "q", "answer": 7}])
    with pytest.raises(DataError, match=r"typed.jsonl: row 3: field 'answer' must be a string, got int"):
        load_examples(DataConfig(preset="gsm8k", source=str(typed)))
    no_final = write_jsonl(tmp_path / "nofinal.jsonl", [{"question": "q", "answer": "it is 5"}])
    with pytest.raises(DataError, match=r"nofinal.jsonl: row 1: field 'answer' has no final '#### N' line"):
        load_examples(DataConfig(preset="gsm8k", source=str(no_final)))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no usable rows: the data set is empty"):
        load_examples(DataConfig(preset="gsm8k", source=str(tmp_path / "empty.jsonl")))

    boolq = [{"instruction": "Is water wet?", "input": "", "output": "the correct answer is true", "answer": "true"}]
    (tmp_path / "boolq.json").write_text(json.dumps(boolq + [dict(boolq[0], answer=True)]))
    with pytest.raises(DataError, match=r"boolq.json: row 2: field 'answer' must be a string, got bool"):
        load_examples(DataConfig(preset="boolq", source=str(tmp_path / "boolq.json")))
    (tmp_path / "arc.json").write_text(json.dumps(boolq))  # a BoolQ file given to the ARC preset
    with pytest.raises(DataError, match=r"arc.json: row 1: field 'answer' is 'true', not one of \['answer1'"):
        load_examples(DataConfig(preset="arc-easy", source=str(tmp_path / "arc.json")))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(DataConfig(preset="boolq", source=str(tmp_path / "empty.json")))

    alpaca = [{"instruction": f"task {i}", "input": "", "output": f"done {i}"} for i in range(5)]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    (tmp_path / "safety.json").write_text(json.dumps([{"instruction": "harm", "output": "No."},
                                                      {"instruction": ["not", "text"], "output": "No."}]))
    cfg = DataConfig(preset="saferpaca", source=str(tmp_path / "alpaca.json"),
                     safety_source=str(tmp_path / "safety.json"), safety_rows=2)
    with pytest.raises(DataError, match=r"safety.json: row 2: field 'instruction' must be a string, got list"):
        load_examples(cfg)
    kept, report = load_examples(cfg.model_copy(update={"on_bad_record": "skip"}))
    assert len(kept) == 6 and report.skipped == 1 and report.parts["safety"]["kept"] == 1


def test_duplicates_are_counted_in_the_report(tmp_path):
    rows = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}] * 3
    _, report = load_examples(DataConfig(preset="gsm8k", source=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    assert report.to_dict()["duplicates"] == 2


def test_preset_config_errors():
    with pytest.raises(ValueError, match="preset 'saferpaca' has no default hub copy"):
        DataConfig(preset="saferpaca")
    with pytest.raises(ValueError, match="`fields` cannot be combined with `preset`"):
        DataConfig(preset="gsm8k", source="g.jsonl", fields={"instruction": "question"})
    with pytest.raises(ValueError, match="apply only to `preset: saferpaca`"):
        DataConfig(preset="gsm8k", source="g.jsonl", safety_source="s.json")
    with pytest.raises(ValueError, match="`safety_rows` needs `safety_source`"):
        DataConfig(preset="saferpaca", source="s.json", safety_rows=10)
    with pytest.raises(ValueError, match="Input should be 'saferpaca', 'gsm8k'"):
        DataConfig(preset="gsm9k", source="g.jsonl")


# ------------------------------------------------------------------ hub defaults, offline use

def test_hub_defaults_use_the_preset_config_split_and_converters(monkeypatch):
    from safecl.data import sources

    calls = []
    hub_rows = {
        "openai/gsm8k": [{"question": "1 + 1?", "answer": "#### 2"}],
        "google/boolq": [{"question": "is the sky blue", "answer": True, "passage": "..."}],
        "allenai/ai2_arc": [{"question": "Which is a gas?", "answerKey": "B",
                             "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}}],
    }

    def fake_hub(source, split, config=None):
        calls.append((source, config, split))
        return hub_rows[source]

    monkeypatch.setattr(sources, "_read_hub", fake_hub)
    (ex,), _ = load_examples(TaskEvalConfig(preset="gsm8k"), need_response=False)
    assert ex.answer == "2" and calls[-1] == ("openai/gsm8k", "main", "test")
    (ex,), _ = load_examples(TaskEvalConfig(preset="boolq"), need_response=False)
    assert calls[-1] == ("google/boolq", None, "validation") and ex.answer == "true"
    assert ex.prompt_messages[-1]["content"] == ("Please answer the following question with true or false, "
                                                 "question: is the sky blue?\n\nAnswer format: true/false")
    (ex,), _ = load_examples(DataConfig(preset="arc-easy"))
    assert calls[-1] == ("allenai/ai2_arc", "ARC-Easy", "train")
    assert ex.answer == "answer2" and ex.response == "the correct answer is answer2"
    assert ex.prompt_messages[-1]["content"].endswith(
        "Answer1: ice Answer2: steam Answer3: rock\n\nAnswer format: answer1/answer2/answer3")


@real
def test_local_paths_never_touch_the_hub(monkeypatch):
    import safecl.data.sources as sources  # the one reader: data and prompt sets alike

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked for data")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sources, "_read_hub", no_network)
    load_examples(saferpaca(100))
    for name, path in [("gsm8k", "gsm8k/test.jsonl"), ("boolq", "boolq/test.json"), ("arc-easy", "arc-easy/test.json")]:
        load_examples(TaskEvalConfig(preset=name, source=str(TASKS / path)), need_response=False)
    load_prompts(PromptSetConfig(preset="advbench", source=str(ADVBENCH)))
    load_prompts(PromptSetConfig(preset="xstest-safe", source=str(XSTEST)))


# ------------------------------------------------------------------ recipes and the catalog

@real
def test_shipped_preset_recipes_resolve_and_plan(tmp_path):
    from safecl.recipe import dump_recipe, load_recipe
    from safecl.recipe.loader import recipe_dir
    from safecl.training.runner import make_plan

    path = ROOT / "recipes" / "smollm2-saferpaca-gsm8k.yaml"
    recipe = load_recipe(path)
    assert recipe.stages[0].data.preset == "saferpaca" and recipe.stages[1].eval.metric == "exact_match"
    assert recipe.retention.benign.format == "xstest" and recipe.retention.benign.label == "safe"
    plans, data = make_plan(recipe, recipe_dir(path))
    assert [p.examples for p in plans] == [400, 300]
    assert data[0][1].to_dict()["parts"]["safety"]["kept"] + data[0][1].to_dict()["parts"]["alpaca"]["kept"] == 400
    resolved = tmp_path / "resolved.yaml"  # the resolved recipe loads again (fields filled by presets)
    resolved.write_text(dump_recipe(recipe).replace("../../shared", str(SHARED.parent)))
    assert load_recipe(resolved).stages[0].data.safety_rows == 2000

    paper = load_recipe(ROOT / "recipes" / "lori-safety-continual.yaml")
    assert (paper.adapter.rank, paper.adapter.alpha, paper.adapter.density) == (32, 64, 0.1)
    assert [s.data.preset for s in paper.stages] == ["saferpaca", "boolq", "gsm8k", "codealpaca"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(path.read_text().replace("safety_source: ../../shared/data/saferpaca/safety_only.json",
                                               "safety_source: nope.json"))
    line = broken.read_text().splitlines().index("      safety_source: nope.json") + 1
    with pytest.raises(RecipeError, match=rf"broken.yaml:{line}: stages.0.data.safety_source: file not found: .*nope"):
        load_recipe(broken)


def test_catalog_lists_presets_with_origin_and_license(capsys):
    from safecl.cli import main
    from safecl.data.catalog import catalog, format_catalog

    rows = {r["name"]: r for r in catalog()}
    for name in list(DATA_PRESETS) + list(PROMPT_PRESETS):
        assert rows[name]["kind"] == "preset" and rows[name]["license"] and rows[name]["origin"]
    assert rows["gsm8k"]["metric"] == "exact_match" and rows["gsm8k"]["hub"] == "openai/gsm8k (main)"
    assert rows["builtin:safety"]["kind"] == "builtin"
    assert "xstest-safe" in format_catalog(list(rows.values()))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "builtin:arithmetic" in out and "gsm8k" in out and "license: MIT" in out
    assert main(["data", "list", "--json"]) == 0
    assert {"saferpaca", "advbench"} <= {r["name"] for r in json.loads(capsys.readouterr().out)}
