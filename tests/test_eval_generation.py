"""Batched, left-padded generation on a tiny Llama: same responses as one by one, nothing left changed."""

import pytest
import torch

from safecl.evaluation.generation import generate
import tests.conftest_eval as tiny
from tests.conftest_eval import model, tok  # noqa: F401  (fixtures)

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Tell me a much longer story about cats and their owners, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "Another prompt of middling length"}],
]


def _alone(model, tok, conv, max_new_tokens):
    """Reference: one conversation, no padding, decoded new tokens."""
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_batched_equals_one_by_one(model, tok):
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    single = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1, progress=False)
    assert batched == single
    assert batched == [_alone(model, tok, conv, 12) for conv in PROMPTS]  # new tokens only, input order
    for conv, response in zip(PROMPTS, batched):
        assert conv[-1]["content"] not in response and "assistant" not in response
        assert response


def test_state_is_restored(model, tok):
    tok.padding_side = "right"
    model.train()
    try:
        generate(model, tok, PROMPTS[:2], max_new_tokens=2, batch_size=2, progress=False)
        assert tok.padding_side == "right" and model.training
        model.eval()
        tok.padding_side = "left"
        generate(model, tok, PROMPTS[:2], max_new_tokens=2, batch_size=2, progress=False)
        assert tok.padding_side == "left" and not model.training
    finally:
        model.eval()
        tok.padding_side = "right"


def test_no_pad_token_pads_with_eos_and_restores(model):
    tok = tiny.tiny_tokenizer(with_pad=False)
    assert tok.pad_token is None
    responses = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=5, progress=False)
    assert tok.pad_token is None
    assert responses == generate(model, tiny.tiny_tokenizer(), PROMPTS, max_new_tokens=6, batch_size=1,
                                 progress=False)


def test_stop_early_cuts_each_sequence_on_its_own(model, tok):
    full = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=5, progress=False)
    seen = []

    def stop(partial):
        seen.append(partial)
        return len(partial) >= 3

    cut = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=5, stop_early=stop, progress=False)
    assert seen
    for short, long in zip(cut, full):
        # byte-level decoding may end a cut response inside a multi-byte character
        assert long.startswith(short.rstrip("\ufffd")) and len(short) < len(long)
    never = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2, stop_early=lambda s: False,
                     progress=False)
    assert never == full


def test_argument_errors(model, tok):
    assert generate(model, tok, [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="conversation 1 is empty"):
        generate(model, tok, [PROMPTS[0], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        generate(model, tok, PROMPTS, max_new_tokens=0)
