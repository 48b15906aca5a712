"""Task scores from likelihoods: one teacher-forced forward pass per sequence, no generation.

gold_nll(model, tokenizer, examples)
    For each example with a gold response y = y_1..y_m (the assistant turn, encoded exactly as
    the stage trains on it: the chat template, the response and the template's end-of-turn
    tokens, :func:`safecl.data.formatting.encode_example`),

        nll(x, y) = -(1/m) sum_t log p(y_t | x, y_<t)

    the mean over the response tokens only; the set's score is the mean over examples (each
    example weighs the same; the bootstrap resamples examples). Lower is better. It moves when
    a model learns a task whose exact match sits at 0 (GSM8K at 135M). Invariant to the batch
    size and to the tokenizer's padding side (safecl pads right itself) up to float
    reassociation (tested within 1e-5).

choice_scores(model, tokenizer, examples, labels)
    Multiple choice by log-likelihood, as lm-evaluation-harness scores ``acc`` for its
    ``boolq`` / ``arc_easy`` tasks: for each example the context c is its prompt through the
    chat template (assistant turn opened, as trained) and each choice k is a continuation
    r_k = the gold response with the gold label replaced by label k ("the correct answer is
    true" -> "... is false"); the prediction is argmax_k sum_t log p(r_k,t | c, r_k,<t) (the
    unnormalised sum, the harness's ``acc``); the score is 1 when it is the gold label. The
    choices offered are the labels named in the prompt as whole words (ARC rows offer 3-5 of
    answer1..answer5), or every label when fewer than two are named. Continuation tokens are
    tokens(c + r_k) minus tokens(c) after the context's trailing whitespace moves to r_k, the
    harness's split. Agreement with the harness on the
    same examples is tested (tests/test_likelihood.py).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from safecl.data.formatting import IGNORE, Encoded, collate, encode_example, render
from safecl.data.records import Example
from safecl.errors import DataError
from safecl.logits import labelled_logits, labelled_targets


def _device(model) -> torch.device:
    return next(model.parameters()).device


def sequence_nlls(model, encoded: list[Encoded], pad_id: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed NLL of the labelled tokens, their number) per sequence, in order, no gradient."""
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    dev = _device(model)
    try:
        with torch.no_grad():
            for i in range(0, len(encoded), batch_size):
                part = encoded[i:i + batch_size]
                batch = {k: v.to(dev) for k, v in collate(part, pad_id).items()}
                logits = labelled_logits(model, batch).float()
                nll = F.cross_entropy(logits, labelled_targets(batch["labels"]), reduction="none")
                counts = [sum(t != IGNORE for t in e.labels[1:]) for e in part]
                out += [(float(x.sum()), n) for x, n in zip(nll.split(counts), counts)]
    finally:
        model.train(was_training)
    return out


def gold_nll(model, tokenizer, examples: list[Example], max_len: int = 1024, batch_size: int = 16) -> list[float]:
    """Per example: mean NLL per gold-response token (see the module doc).

    Raises:
        DataError: an example has no gold response, or truncation at ``max_len`` leaves none of it.
    """
    encoded = []
    for ex in examples:
        if ex.response is None or not ex.response.strip():
            raise DataError(f"{ex.origin}: no gold response to score the NLL of (gold_nll needs the eval's "
                            "assistant turn; set `gold_nll: false` for this eval)")
        enc = encode_example(tokenizer, ex, max_len)
        if enc is None:
            raise DataError(f"{ex.origin}: the prompt fills all {max_len} tokens; no response token is left to score")
        encoded.append(enc)
    return [s / n for s, n in sequence_nlls(model, encoded, tokenizer.pad_token_id, batch_size)]


def offered_labels(prompt: str, labels: list[str]) -> list[str]:
    """The labels named in ``prompt`` as whole words (case-insensitive), or all when < 2 are."""
    named = [lab for lab in labels if re.search(rf"(?<![\w-]){re.escape(lab)}(?![\w-])", prompt, re.IGNORECASE)]
    return named if len(named) >= 2 else list(labels)


def choice_continuations(ex: Example, labels: list[str]) -> tuple[list[str], int]:
    """(continuation text per offered label, index of the gold one) for one example."""
    gold = str(ex.answer).strip()
    prompt = next((m["content"] for m in reversed(ex.prompt_messages) if m["role"] == "user"), "")
    offered = offered_labels(prompt, labels)
    lowered = [lab.lower() for lab in offered]
    if gold.lower() not in lowered:
        raise DataError(f"{ex.origin}: gold answer {gold!r} is not among the choices {offered}")
    response = ex.response or gold
    at = response.lower().rfind(gold.lower())
    if at < 0:
        raise DataError(f"{ex.origin}: the gold response {response!r} does not contain the answer {gold!r}")
    texts = [response[:at] + lab + response[at + len(gold):] for lab in offered]
    return texts, lowered.index(gold.lower())


def choice_requests(tokenizer, examples: list[Example], labels: list[str]) -> list[tuple[str, list[str], int]]:
    """(context, continuations, gold index) per example: what the harness is given too."""
    out = []
    for ex in examples:
        texts, gold = choice_continuations(ex, labels)
        out.append((render(tokenizer, ex.prompt_messages, add_generation_prompt=True), texts, gold))
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as the harness splits them: trailing whitespace of
    the context moves to the continuation, then tokens(context + continuation) minus tokens(context)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return c_ids, whole[len(c_ids):]


def choice_scores(model, tokenizer, examples: list[Example], labels: list[str], batch_size: int = 16) -> dict:
    """{"values": 1.0/0.0 per example, "picked": choice index per example, "loglik": per choice,
    "choices": the continuation texts per example}."""
    requests = choice_requests(tokenizer, examples, labels)
    encoded, owners = [], []
    for i, (context, continuations, _) in enumerate(requests):
        for text in continuations:
            c_ids, cont = encode_pair(tokenizer, context, text)
            encoded.append(Encoded(c_ids + cont, [IGNORE] * len(c_ids) + cont))
            owners.append(i)
    sums = sequence_nlls(model, encoded, tokenizer.pad_token_id, batch_size)
    loglik: list[list[float]] = [[] for _ in requests]
    for owner, (s, _) in zip(owners, sums):
        loglik[owner].append(-s)
    picked = [max(range(len(ll)), key=ll.__getitem__) for ll in loglik]
    values = [1.0 if p == gold else 0.0 for p, (_, _, gold) in zip(picked, requests)]
    return {"values": values, "picked": picked, "loglik": loglik, "choices": [texts for _, texts, _ in requests]}
