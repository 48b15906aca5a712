"""safecl's greedy decoder (shared prefix, chunked prefill, rows dropped as they end) against
``model.generate`` one prompt at a time, on a tiny Llama: the same tokens, row by row."""

import pytest
import torch

from safecl.evaluation import decoding
from safecl.evaluation.generation import generate
from tests.conftest_eval import model, tok  # noqa: F401  (fixtures)

CONTENTS = ["hi", "Tell me a much longer story about cats and their owners, please.", "x",
            "How do I bake bread?", "Another prompt of middling length", "ok then", "What is 2 + 2?"]


def _ids(tok, contents):
    return [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for c in contents]


def _alone(model, ids, max_new_tokens, eos=None, stop=None):
    """Reference: ``model.generate`` on one prompt, no padding; new tokens (EOS kept)."""
    kwargs = {"eos_token_id": eos} if eos is not None else {}
    if stop is not None:
        from safecl.evaluation.generation import _StopWhen
        from transformers import StoppingCriteriaList
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhen(stop[0], len(ids), stop[1])])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    new = out[0, len(ids):].tolist()
    if eos is not None and eos in new:
        new = new[:new.index(eos) + 1]
    return new


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else x["input_ids"]


@pytest.mark.parametrize("batch_size,prefill_rows", [(1, 1), (3, 2), (7, 3), (7, 16)])
def test_same_tokens_as_generate_alone(model, tok, batch_size, prefill_rows):
    prompts = [_as_list(p) for p in _ids(tok, CONTENTS)]
    assert decoding.common_prefix_length(prompts) >= 6  # "<|im_start|>user\n" is shared: the prefix path runs
    got = decoding.greedy_decode(model, prompts, 10, batch_size, {tok.eos_token_id}, tok.pad_token_id,
                                 prefill_rows=prefill_rows)
    assert got == [_alone(model, p, 10) for p in prompts]


def test_rows_end_at_eos_and_on_finished_others_go_on(model, tok):
    prompts = [_as_list(p) for p in _ids(tok, CONTENTS)]
    free = decoding.greedy_decode(model, prompts, 12, 7, set(), tok.pad_token_id)
    eos = free[1][3]  # a token row 1 emits 4th: as "EOS" it must end row 1 there, and every row that emits it
    got = decoding.greedy_decode(model, prompts, 12, 7, {eos}, tok.pad_token_id, prefill_rows=2)
    assert got == [_alone(model, p, 12, eos=eos) for p in prompts]
    assert got[1] == free[1][:4]
    ended = []
    cut = decoding.greedy_decode(model, prompts, 12, 7, set(), tok.pad_token_id, on_row_done=ended.append,
                                 finished=lambda idx, toks: [len(t) >= 2 + i for i, t in zip(idx, toks)])
    assert [len(t) for t in cut] == [min(2 + i, 12) for i in range(len(prompts))]
    assert cut == [f[:len(c)] for f, c in zip(free, cut)] and sum(ended) == len(prompts)


def test_generate_with_early_stop_matches_generate_alone(model, tok):
    convs = [[{"role": "user", "content": c}] for c in CONTENTS]

    def stop(text):
        return " " in text[2:]

    ours = generate(model, tok, convs, max_new_tokens=14, batch_size=4, stop_early=stop, progress=False)
    hf = generate(model, tok, convs, max_new_tokens=14, batch_size=1, stop_early=stop, progress=False, engine="hf")
    assert ours == hf
    assert any(len(a) < len(b) for a, b in zip(ours, generate(model, tok, convs, 14, 4, progress=False)))


def test_logits_processors_and_sliding_windows_fall_back_to_generate(model, tok):
    convs = [[{"role": "user", "content": c}] for c in CONTENTS[:3]]
    assert decoding.supported(model)
    plain = generate(model, tok, convs, max_new_tokens=12, progress=False)
    model.generation_config.repetition_penalty = 3.0
    try:
        assert not decoding.supported(model)
        penalized = generate(model, tok, convs, max_new_tokens=12, progress=False)
        assert penalized == generate(model, tok, convs, max_new_tokens=12, progress=False, engine="hf")
        assert penalized != plain  # the penalty took effect: generate() honoured it
    finally:
        model.generation_config.repetition_penalty = 1.0
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    windowed = MistralForCausalLM(MistralConfig(  # its cache keeps 4 positions per layer: not this decoder's layout
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, sliding_window=4, initializer_range=0.5,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    with pytest.raises(decoding.UnsupportedCache):
        decoding.greedy_decode(windowed, [[1, 2, 3], [1, 2, 4]], 3, 2, set(), tok.pad_token_id)
    assert generate(windowed, tok, convs, max_new_tokens=8, progress=False) == \
        generate(windowed, tok, convs, max_new_tokens=8, progress=False, engine="hf")

    class NoPositions(torch.nn.Module):  # a causal LM whose forward takes no position ids
        config = model.config

        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
            raise AssertionError("not called")

    assert not decoding.supported(NoPositions())
    with pytest.raises(ValueError, match="engine"):
        generate(model, tok, convs, max_new_tokens=2, engine="fast")


def test_a_model_returning_another_cache_falls_back(model, tok, monkeypatch):
    convs = [[{"role": "user", "content": c}] for c in CONTENTS[:3]]
    calls = []

    def refuse(cache):
        calls.append(type(cache).__name__)
        return False

    monkeypatch.setattr(decoding, "_plain_dynamic", refuse)
    got = generate(model, tok, convs, max_new_tokens=6, progress=False)
    assert calls and got == generate(model, tok, convs, max_new_tokens=6, progress=False, engine="hf")
