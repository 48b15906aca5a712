"""Task scores by EleutherAI's lm-evaluation-harness (``metric: harness``), on the model in memory.

What runs: the stage eval's examples exactly as safecl reads them (its reader, preset and
``limit``) are written to a JSONL file in a temporary folder (``question`` = the user turn,
``answer`` = the gold answer), and a harness task config over that file (``dataset_path: json``:
local, never the hub) is run by ``lm_eval.simple_evaluate`` on the model object, greedy, through
the model's chat template. The harness generates and scores with its own filters and metric; its
version and the task config (YAML) are recorded in ``measured_by`` next to the number.

Templates (``harness: NAME``):

- ``gsm8k``: ``generate_until``; filter: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (the
  harness's GSM8K "flexible-extract"); metric ``exact_match`` after removing ``,`` ``$`` and a
  trailing ``.``. It agrees with safecl's ``exact_match`` (last number equals the answer
  numerically) except where string and number differ: "18.0" for 18 or "2.50" for 2.5 is right
  for safecl, wrong for the harness (tested in tests/test_harness.py).

- ``boolq``, ``arc_easy``: ``multiple_choice`` as the harness runs its own BoolQ and ARC-Easy
  tasks: the prediction is the choice of highest summed log-likelihood given the context
  (metric ``acc``). Each document is ``question`` (the user turn), ``choices`` (the gold response
  with each offered label swapped in) and ``gold`` (the gold choice's index), built by
  :func:`safecl.evaluation.likelihood.choice_requests`, so the harness scores exactly what
  safecl's own ``metric: choice`` scores (their agreement is tested).

The built-in scorers stay the light default: the harness adds ~6 s of import and its own
generation loop, which has no early stop.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from safecl.errors import DataError

TEMPLATES = {
    "gsm8k": """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_new_tokens}
filter_list:
  - name: last-number
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "\\\\.$"]
""",
}
_CHOICE = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
CHOICE_TEMPLATES = ("boolq", "arc_easy")
TEMPLATES.update({name: _CHOICE for name in CHOICE_TEMPLATES})
METRIC = {"gsm8k": "exact_match,last-number", "boolq": "acc,none", "arc_easy": "acc,none"}


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataError("metric: harness needs lm-evaluation-harness: pip install 'safecl[harness]' "
                        f"(lm-eval 0.4.x); import failed: {exc}") from None
    return lm_eval, TaskManager


def harness_lm(model, tokenizer, batch_size: int):
    """The harness's Hugging Face LM around the model object (no copy, no reload)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_harness(template: str, docs: list[dict], lm, max_new_tokens: int, chat_template: bool = True) -> dict:
    """Score ``docs`` with the harness template on ``lm`` (an lm_eval LM). A doc is
    {"question", "answer"} (gsm8k) or {"question", "choices", "gold"} (boolq, arc_easy).

    Returns {"values": [1.0/0.0 per doc], "responses", "extracted", "seconds", "measured_by"};
    for a multiple-choice template the response is the picked choice and ``extracted`` its index.
    """
    if template not in TEMPLATES:
        raise DataError(f"unknown harness template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
    lm_eval, TaskManager = _lm_eval()
    start = time.perf_counter()
    task = f"safecl_{template}"
    with tempfile.TemporaryDirectory(prefix="safecl-harness-") as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
        config = TEMPLATES[template].format(task=task, data=data, max_new_tokens=max_new_tokens)
        (Path(tmp) / f"{task}.yaml").write_text(config, encoding="utf-8")
        tasks = TaskManager(include_path=tmp, include_defaults=False)  # the harness's own index takes ~40 s
        result = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, log_samples=True,
                                         apply_chat_template=chat_template, verbosity="ERROR")
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    metric = METRIC[template].split(",")[0]
    values = [float(s[metric]) for s in samples]
    if template in CHOICE_TEMPLATES:
        picked = [max(range(len(s["filtered_resps"])), key=lambda k, s=s: s["filtered_resps"][k][0]) for s in samples]
        responses = [doc["choices"][k] for doc, k in zip(docs, picked)]
        extracted: list = picked
    else:
        responses = [s["resps"][0][0] for s in samples]
        extracted = [s["filtered_resps"][0] for s in samples]
    return {
        "values": values,
        "responses": responses,
        "extracted": extracted,
        "seconds": time.perf_counter() - start,
        "measured_by": {"kind": "metric", "metric": "harness", "backend": "lm-evaluation-harness",
                        "version": getattr(lm_eval, "__version__", "unknown"), "template": template,
                        "harness_metric": METRIC[template], "chat_template": chat_template,
                        "task_config": config.replace(str(data), "<the eval's examples as JSONL>")},
    }
