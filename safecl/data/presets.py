"""Named public data sets: what the ``preset:`` key of a recipe means.

A preset knows a public data set's own row layout and turns each row into safecl's
instruction form, so a recipe names the data set and says only where its file lies::

    data: {preset: gsm8k, source: ../shared/data/tasks/gsm8k/train.jsonl}
    eval: {preset: gsm8k, source: ../shared/data/tasks/gsm8k/test.jsonl}   # metric exact_match
    data: {preset: saferpaca, source: alpaca_2k.json, safety_source: safety_only.json, safety_rows: 2000}
    harmful: {preset: advbench, source: ../shared/data/safety_eval/advbench_harmful_behaviors.csv}

``source`` may be left out when the preset has a default hub id (loaded with
``datasets.load_dataset``: it needs the network or a warm cache). With local paths nothing
here touches the network (``datasets`` is not even imported).

Two kinds:

- :class:`DataPreset`, for a stage's ``data`` and a task's ``eval``:
  ``to_row(raw) -> {instruction, input, output, answer}``. A row that lacks a field or holds
  the wrong type raises ValueError naming the field; the loader adds file and row. ``metric``
  and ``labels`` are the task's default scoring (None: no gold answer, training only).
- :class:`PromptPreset`, for ``retention.harmful`` / ``retention.benign``: the prompt-file
  format of :mod:`safecl.evaluation.prompts` and the XSTest label to keep.

Each preset names where the data comes from (``origin``: repository and commit of the copy in
``../shared/data``, or the paper) and its ``license``; ``safecl data list`` prints both.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

SAFERPACA_SAFETY_ROWS = 2000  # saferpaca_Instructions_2000.json, the release most papers use


@dataclass(frozen=True)
class DataPreset:
    """A training/eval data set: raw row -> {instruction, input, output, answer}."""

    name: str
    title: str  # one line for `safecl data list`
    origin: str  # where the rows come from (repository @ commit, or the paper)
    license: str
    to_row: Callable[[dict], dict]
    files: str  # the public file(s) and where this workspace keeps a copy
    hub: str | None = None  # default hub dataset id when `source` is left out
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)  # safecl split -> hub split
    metric: str | None = None  # "exact_match" | "label_accuracy" | None (no gold answer)
    labels: tuple[str, ...] | None = None  # label_accuracy: the label words


@dataclass(frozen=True)
class PromptPreset:
    """A retention prompt set: a file format of safecl.evaluation.prompts and a label filter."""

    name: str
    title: str
    origin: str
    license: str
    format: str  # advbench | xstest | hexphi | instructions
    role: str  # "harmful" (refusal wanted) or "benign" (over-refusal measured)
    files: str
    label: str | None = None  # xstest: keep rows with this label
    hub: str | None = None
    hub_split: str = "train"


# --------------------------------------------------------------------------- row checks

def _text(row: dict, key: str, required: bool = True) -> str:
    """``row[key]`` as a string; ValueError naming the field when missing, not a string or empty."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    value = row.get(key)
    if value is None:
        if required:
            raise ValueError(f"field {key!r} is missing (row has {sorted(row)})")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__} {str(value)[:40]!r}")
    if required and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def instruction_row(row: dict) -> dict:
    """Alpaca form ``{instruction, input, output}`` (``input`` may be missing or empty), as is."""
    return {"instruction": _text(row, "instruction"), "input": _text(row, "input", required=False),
            "output": _text(row, "output")}


_FINAL = re.compile(r"####\s*(\S.*?)\s*$", re.DOTALL)
_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_row(row: dict) -> dict:
    """GSM8K ``{question, answer}``; ``answer`` is a worked solution whose last line is ``#### N``.

    instruction = question; output = the worked solution with the calculator annotations
    ``<<48/2=24>>`` removed and the final ``#### N`` line replaced by ``The answer is N.``
    (so the last number of the output is the answer, which is what exact_match reads);
    answer = N with thousands commas removed.
    """
    question, solution = _text(row, "question"), _text(row, "answer")
    match = _FINAL.search(solution)
    if match is None:
        raise ValueError("field 'answer' has no final '#### N' line")
    final = match.group(1).replace(",", "").strip()
    worked = _CALC.sub("", solution[: match.start()]).strip()
    output = f"{worked}\nThe answer is {final}." if worked else f"The answer is {final}."
    return {"instruction": question, "input": "", "output": output, "answer": final}


def humaneval_row(row: dict) -> dict:
    """HumanEval ``{task_id, prompt, entry_point, test}``: the user is asked to complete the function
    (its signature and docstring, in a python block); ``answer`` = task_id; ``meta`` carries what
    pass@k runs (``safecl.evaluation.execution``): the code prompt, the test and the entry point."""
    code, entry, test = _text(row, "prompt"), _text(row, "entry_point"), _text(row, "test")
    return {"instruction": "Complete this Python function. Answer with the whole function in one ```python block."
                           f"\n\n```python\n{code}```",
            "answer": _text(row, "task_id"), "meta": {"prompt": code, "entry_point": entry, "test": test}}


def _boolq_hub(row: dict) -> dict:
    """google/boolq ``{question, answer: bool, passage}`` -> LLM-Adapters' boolq wording (no passage)."""
    question = _text(row, "question").strip().rstrip("?")
    if not isinstance(row.get("answer"), bool):
        raise ValueError(f"field 'answer' must be a boolean, got {type(row.get('answer')).__name__}")
    return {"instruction": f"Please answer the following question with true or false, question: {question}?"
                           "\n\nAnswer format: true/false",
            "answer": "true" if row["answer"] else "false"}


def _arc_hub(row: dict) -> dict:
    """allenai/ai2_arc ``{question, choices: {text, label}, answerKey}`` -> LLM-Adapters' ARC wording."""
    question, key = _text(row, "question"), _text(row, "answerKey")
    choices = row.get("choices")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list) or len(choices["text"]) != len(choices["label"]):
        raise ValueError("field 'choices' must be {text: [...], label: [...]} of equal length")
    if key not in choices["label"]:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {choices['label']}")
    n = len(choices["text"])
    listed = " ".join(f"Answer{i + 1}: {t}" for i, t in enumerate(choices["text"]))
    fmt = "/".join(f"answer{i + 1}" for i in range(n))
    return {"instruction": f"Please choose the correct answer to the question: {question}\n\n{listed}"
                           f"\n\nAnswer format: {fmt}",
            "answer": f"answer{choices['label'].index(key) + 1}"}


def nlu_row(row: dict, labels: tuple[str, ...], from_hub: Callable[[dict], dict] | None = None) -> dict:
    """LLM-Adapters commonsense form ``{instruction, input, output, answer}``.

    ``output`` is "the correct answer is X" (built from ``answer`` when missing); ``answer``
    must be one of the preset's labels (this catches a file given to the wrong preset). A row
    without ``instruction`` in the hub's own layout is converted by ``from_hub`` first.
    """
    if isinstance(row, dict) and "instruction" not in row and from_hub is not None:
        row = from_hub(row)
    instruction, answer = _text(row, "instruction"), _text(row, "answer").strip()
    if answer.lower() not in labels:
        raise ValueError(f"field 'answer' is {answer!r}, not one of {list(labels)}")
    output = _text(row, "output", required=False).strip() or f"the correct answer is {answer}"
    return {"instruction": instruction, "input": _text(row, "input", required=False), "output": output,
            "answer": answer}


def mix_saferpaca(alpaca: list, safety: list, n_safety: int, seed: int) -> list[tuple[str, object]]:
    """Saferpaca-style mix: every Alpaca row plus ``n_safety`` safety rows drawn without
    replacement with ``random.Random(seed)``, interleaved by a shuffle with the same generator.

    Returns ``[(part, item), ...]`` with part "alpaca" or "safety". Raises ValueError when
    ``n_safety`` exceeds the safety rows available.
    """
    if n_safety > len(safety):
        raise ValueError(f"safety_rows {n_safety} > the {len(safety)} rows of the safety file")
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(safety)), n_safety))
    mixed = [("alpaca", item) for item in alpaca] + [("safety", safety[i]) for i in picked]
    rng.shuffle(mixed)
    return mixed


# --------------------------------------------------------------------------- the registry

_LLM_ADAPTERS = ("LLM-Adapters commonsense format (AGI-Edgerunners/LLM-Adapters dataset/<task>), "
                 "copy at juzhengz/LoRI @ 9183468")
_ANSWER5 = tuple(f"answer{i}" for i in range(1, 6))
_NLU = {
    # name: (title, labels, hub, hub_config, hub_splits, hub converter, license)
    "boolq": ("BoolQ yes/no questions (no passage), 'the correct answer is true|false'", ("true", "false"),
              "google/boolq", None, {"test": "validation"}, _boolq_hub, "CC BY-SA 3.0 (BoolQ); ODC-By (copy)"),
    "arc-easy": ("ARC-Easy science questions, 'the correct answer is answerK'", _ANSWER5,
                 "allenai/ai2_arc", "ARC-Easy", {}, _arc_hub, "CC BY-SA 4.0 (ARC); ODC-By (copy)"),
    "arc-challenge": ("ARC-Challenge science questions, 'the correct answer is answerK'", _ANSWER5,
                      "allenai/ai2_arc", "ARC-Challenge", {}, _arc_hub, "CC BY-SA 4.0 (ARC); ODC-By (copy)"),
    "piqa": ("PIQA physical commonsense, 'the correct answer is solution1|solution2'", ("solution1", "solution2"),
             None, None, {}, None, "AFL-3.0 (PIQA); ODC-By (copy)"),
    "siqa": ("Social IQa, 'the correct answer is answerK'", ("answer1", "answer2", "answer3"),
             None, None, {}, None, "original: see the Social IQa release (not checked here); ODC-By (copy)"),
    "openbookqa": ("OpenBookQA, 'the correct answer is answerK'", tuple(f"answer{i}" for i in range(1, 5)),
                   None, None, {}, None, "original: see the OpenBookQA release (not checked here); ODC-By (copy)"),
    "hellaswag": ("HellaSwag endings, 'the correct answer is endingK'", tuple(f"ending{i}" for i in range(1, 5)),
                  None, None, {}, None, "MIT (HellaSwag); ODC-By (copy)"),
    "winogrande": ("WinoGrande, 'the correct answer is option1|option2'", ("option1", "option2"),
                   None, None, {}, None, "CC BY 4.0 (WinoGrande); ODC-By (copy)"),
}

DATA_PRESETS: dict[str, DataPreset] = {
    "saferpaca": DataPreset(
        name="saferpaca",
        title="Alpaca + N safety rows with safe answers (Bianchi et al. 2024, Safety-Tuned LLaMAs)",
        origin="vinid/safety-tuned-llamas @ 36a4b8d (data/training/safety_only_data_Instructions.json; "
               "the release saferpaca_Instructions_N.json is 20k Alpaca rows + N safety rows); Alpaca rows from "
               "Antelofski/alpaca-lora @ 4247f48 alpaca_small.json",
        license="safety rows: no license file (research use); Alpaca: CC BY-NC 4.0 data, ODC-By copy",
        to_row=instruction_row,
        files="an already mixed saferpaca_Instructions_N.json as `source`, or Alpaca rows as `source` + "
              "`safety_source` (here: ../shared/data/saferpaca/{alpaca_2k.json,safety_only.json})",
    ),
    "gsm8k": DataPreset(
        name="gsm8k",
        title="GSM8K math word problems; output = worked solution ending 'The answer is N.'",
        origin="openai/grade-school-math @ 3101c7d (Cobbe et al. 2021)",
        license="MIT",
        to_row=gsm8k_row,
        files="grade_school_math/data/{train,test}.jsonl (here: ../shared/data/tasks/gsm8k/)",
        hub="openai/gsm8k", hub_config="main", metric="exact_match",
    ),
    "codealpaca": DataPreset(
        name="codealpaca",
        title="Code Alpaca instruction-following for code (instruction form, no gold answer)",
        origin="sahil280114/codealpaca @ 2f78ddc (code_alpaca_20k.json; 2k sample in ../shared/data)",
        license="CC BY-NC 4.0",
        to_row=instruction_row,
        files="code_alpaca_20k.json (here: ../shared/data/tasks/codealpaca/code_alpaca_2k.json)",
        hub="sahil2801/CodeAlpaca-20k",
    ),
    "humaneval": DataPreset(
        name="humaneval",
        title="HumanEval: complete a Python function; scored by running its tests (pass@1, opt-in)",
        origin="openai/human-eval @ 6d43fb9 (Chen et al. 2021)",
        license="MIT",
        to_row=humaneval_row,
        files="HumanEval.jsonl.gz (here: ../shared/data/tasks/humaneval/)",
        hub="openai/openai_humaneval", metric="pass_at_k",
    ),
    **{name: DataPreset(
        name=name, title=title, origin=_LLM_ADAPTERS, license=lic,
        to_row=partial(nlu_row, labels=labels, from_hub=conv),
        files=f"dataset/{name}/{{train,test}}.json" + (" (here: ../shared/data/tasks/" + name + "/)"
                                                       if name in ("boolq", "arc-easy") else ""),
        hub=hub, hub_config=cfg, hub_splits=splits, metric="label_accuracy", labels=labels,
    ) for name, (title, labels, hub, cfg, splits, conv, lic) in _NLU.items()},
}

PROMPT_PRESETS: dict[str, PromptPreset] = {
    "advbench": PromptPreset(
        name="advbench", title="AdvBench harmful behaviors (520 goals)",
        origin="llm-attacks/llm-attacks harmful_behaviors.csv (Zou et al. 2023); "
               "copy at ab235/AttnGCG-attack @ 6d9f1a4",
        license="MIT", format="advbench", role="harmful",
        files="harmful_behaviors.csv (here: ../shared/data/safety_eval/advbench_harmful_behaviors.csv)",
        hub="walledai/AdvBench",
    ),
    "xstest-safe": PromptPreset(
        name="xstest-safe", title="XSTest's 250 safe prompts a calibrated model answers (over-refusal)",
        origin="paul-rottger/exaggerated-safety @ d7bb5bd xstest_prompts.csv (Roettger et al. 2024)",
        license="CC BY 4.0", format="xstest", role="benign", label="safe",
        files="xstest_prompts.csv (here: ../shared/data/safety_eval/xstest_prompts.csv)",
        hub="walledai/XSTest",
    ),
    "xstest-unsafe": PromptPreset(
        name="xstest-unsafe", title="XSTest's 200 unsafe contrast prompts (refusal)",
        origin="paul-rottger/exaggerated-safety @ d7bb5bd xstest_prompts.csv (Roettger et al. 2024)",
        license="CC BY 4.0", format="xstest", role="harmful", label="unsafe",
        files="xstest_prompts.csv (here: ../shared/data/safety_eval/xstest_prompts.csv)",
        hub="walledai/XSTest",
    ),
    "hexphi": PromptPreset(
        name="hexphi", title="HEx-PHI harmful instructions, 11 categories (JSONL {instruction, category})",
        origin="LLM-Tuning-Safety/HEx-PHI (Qi et al. 2024), gated on the hub",
        license="HEx-PHI terms of use (accepted on the hub; research only, no redistribution)",
        format="hexphi", role="harmful",
        files="a JSONL of {instruction, category} made from the gated category CSVs (no copy here)",
    ),
    "malicious-instructions": PromptPreset(
        name="malicious-instructions", title="Safety-Tuned LLaMAs' 100 malicious instructions",
        origin="vinid/safety-tuned-llamas @ 36a4b8d data/evaluation/I-MaliciousInstructions.json",
        license="no license file in the repository (research use)", format="instructions", role="harmful",
        files="I-MaliciousInstructions.json (here: ../shared/data/safety_eval/)",
    ),
}

DATA_PRESET_NAMES = tuple(DATA_PRESETS)
PROMPT_PRESET_NAMES = tuple(PROMPT_PRESETS)


# --------------------------------------------------------------------------- recipe defaults

def preset_named(data, registry: dict):
    """The preset a raw recipe mapping names in ``preset`` (None if it names none in ``registry``;
    a ``preset`` that is not a name is left to the schema, which names the key)."""
    name = data.get("preset") if isinstance(data, dict) else None
    return registry.get(name) if isinstance(name, str) else None


def fill_hub_source(preset, data: dict) -> tuple[dict, bool]:
    """(a copy of ``data`` whose empty ``source`` is the preset's hub id, whether it was filled).

    Raises ValueError naming the public files when the preset has no hub copy.
    """
    data = dict(data)
    if data.get("source"):
        return data, False
    if preset.hub is None:
        raise ValueError(f"preset {preset.name!r} has no default hub copy: set `source` to a local file "
                         f"({preset.files})")
    data["source"] = preset.hub
    return data, True
