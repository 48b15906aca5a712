"""Batched generation of chat responses for evaluation.

``generate`` renders each conversation with the tokenizer's chat template (with the
assistant opening added: ``add_generation_prompt=True``), tokenizes a batch with LEFT
padding so every prompt ends at the same position, runs ``model.generate`` and returns only
the decoded NEW tokens (special tokens skipped), in the order of the input.

Invariants:
- Batching does not change a greedy response: positions come from the attention mask, so
  a left-padded prompt is computed as if alone (tested against batch size 1).
- Nothing is left changed: the tokenizer's ``padding_side`` and ``pad_token`` and the
  model's training mode are restored, also when generation raises.
- Prompts are sorted by length before batching (less padding) and the responses are
  returned in input order.

Engines: greedy decoding of a model :func:`safecl.evaluation.decoding.supported` accepts runs
through :func:`safecl.evaluation.decoding.greedy_decode` (the shared prompt prefix computed
once, rows dropped as they end: the same tokens, fewer forwards); sampling, FSDP-sharded
models (lockstep across ranks) and everything else call ``model.generate``. ``engine="hf"``
forces ``model.generate`` (the reference the tests compare against). Both work with any
Hugging Face causal LM, including models whose linear layers were wrapped by custom adapter
modules.

Early stop: ``stop_early(partial_response: str) -> bool`` is called after every new token
for each unfinished sequence with its decoded response so far; a sequence stops (and is
padded) once it returns True. Other sequences of the batch go on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from safecl.evaluation import decoding


class _StopWhen(StoppingCriteria):
    """Per-sequence stop: decode the new tokens of each row and ask ``predicate``."""

    def __init__(self, tokenizer, prompt_len: int, predicate: Callable[[str], bool]):
        self.tokenizer, self.prompt_len, self.predicate = tokenizer, prompt_len, predicate

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([bool(self.predicate(t)) for t in texts], dtype=torch.bool, device=input_ids.device)


def fsdp_sharded(model) -> bool:
    """The model was sharded with FSDP2 (``fully_shard``, safecl.training.sharding)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    stop_early: Callable[[str], bool] | None = None,
    progress: bool | None = None,
    desc: str = "generate",
    engine: str = "auto",
) -> list[str]:
    """Responses (new tokens only, decoded) to each chat conversation in ``prompts``.

    Args:
        model: a Hugging Face causal LM (anything with ``generate``).
        tokenizer: its tokenizer; must have a chat template. Without a pad token the EOS
            token pads (temporarily).
        prompts: conversations, each a list of ``{"role", "content"}`` ending with a user turn.
        max_new_tokens: cap on generated tokens per response.
        batch_size: conversations per ``generate`` call.
        do_sample: False = greedy (deterministic). True samples with the model's generation
            config; seed torch beforehand for reproducibility.
        stop_early: optional per-sequence predicate on the partial response (see module doc).
        progress: show a tqdm bar; None = only when stderr is a terminal.
        desc: label of the progress bar.
        engine: ``"auto"`` (greedy: safecl's prefix-sharing decoder where exact, else
            ``model.generate``) or ``"hf"`` (always ``model.generate``).

    Raises:
        ValueError: empty conversation, bad batch_size/max_new_tokens, no pad and no EOS token.
    """
    if engine not in ("auto", "hf"):
        raise ValueError(f"engine must be 'auto' or 'hf', got {engine!r}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if not prompts:
        return []
    for i, conv in enumerate(prompts):
        if not conv:
            raise ValueError(f"conversation {i} is empty")
    if progress is None:
        progress = sys.stderr.isatty()

    old_side, old_pad, was_training = tokenizer.padding_side, tokenizer.pad_token, model.training
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) for conv in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))  # stable: equal lengths keep input order
    responses: list[str | None] = [None] * len(texts)
    gen_kwargs: dict = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                        "pad_token_id": tokenizer.pad_token_id}
    if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is None:
        gen_kwargs["eos_token_id"] = tokenizer.eos_token_id
    if fsdp_sharded(model):  # each forward all-gathers weights: every rank steps until all ranks are done
        gen_kwargs["synced_gpus"] = True
    if not do_sample:  # silence "temperature is set but do_sample=False" from chat models' configs
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    device = _model_device(model)
    model.eval()
    use_decoder = engine == "auto" and not do_sample and "synced_gpus" not in gen_kwargs and decoding.supported(model)
    try:
        with torch.no_grad(), tqdm(total=len(texts), desc=desc, disable=not progress, leave=False) as bar:
            if use_decoder:
                done = _greedy(model, tokenizer, ids, max_new_tokens, batch_size, stop_early, bar.update)
                if done is not None:
                    return done
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, add_special_tokens=False,
                                return_tensors="pt").to(device)
                prompt_len = enc["input_ids"].shape[1]
                kwargs = dict(gen_kwargs)
                if stop_early is not None:
                    kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhen(tokenizer, prompt_len, stop_early)])
                out = model.generate(**enc, **kwargs)
                decoded = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
                for i, text in zip(idx, decoded):
                    responses[i] = text
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return responses  # type: ignore[return-value]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _greedy(model, tokenizer, ids, max_new_tokens, batch_size, stop_early, progress) -> list[str] | None:
    """Responses by :func:`decoding.greedy_decode`; None when the model's cache is not one it handles."""
    finished = None if stop_early is None else (  # the judge, once per step for all rows still going
        lambda _indices, new_tokens: [bool(stop_early(t))
                                      for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)])
    try:
        new = decoding.greedy_decode(model, ids, max_new_tokens, batch_size, _eos_ids(model, tokenizer),
                                     tokenizer.pad_token_id, finished=finished, on_row_done=progress)
    except decoding.UnsupportedCache:
        return None
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]
