"""Tiny offline chat model and tokenizer for the evaluation tests (no downloads).

The tokenizer is byte-level BPE with no merges (one token per byte) plus the ChatML special
tokens; the model is a 2-layer LlamaForCausalLM with random weights. Kept local to the
evaluation tests (a shared builder may later live in safecl).
"""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + <|im_start|>, <|im_end|> (EOS), <pad>."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML, **kwargs)


def tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama whose vocabulary matches ``tokenizer`` (random weights)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,  # spread-out logits: no near-ties for greedy decoding
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer, one per test module (import it with ``model`` as fixtures)."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """The tiny model over ``tok``, one per test module."""
    return tiny_model(tok)
