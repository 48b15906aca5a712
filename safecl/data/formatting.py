"""Chat-template formatting with loss on the response only.

For an example with messages ``m_1 .. m_n`` (``m_n`` the assistant turn)::

    prompt   = template(m_1 .. m_{n-1}, add_generation_prompt=True)
    full     = template(m_1 .. m_n)                 (must start with ``prompt``)
    input_ids = tokens(prompt) + tokens(full[len(prompt):])
    labels    = [-100] * len(tokens(prompt)) + tokens(full[len(prompt):])

so only the response (and the template's end-of-turn tokens after it) carries loss. Sequences
longer than ``max_len`` are cut at ``max_len``; an example whose response is cut away entirely
is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safecl.data.records import Example
from safecl.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def user_text(messages: list[dict]) -> str:
    """The user turns' text, joined by blank lines (no template, no system turn)."""
    return "\n\n".join(m["content"] for m in messages if m["role"] == "user")


def encode_example(tokenizer, example: Example, max_len: int) -> Encoded | None:
    """Token ids and response-only labels; None when truncation removes the whole response."""
    if example.response is None:
        raise DataError(f"{example.origin}: no assistant turn to train on")
    prompt = render(tokenizer, example.prompt_messages, add_generation_prompt=True)
    full = render(tokenizer, example.messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise DataError(
            f"{example.origin}: the chat template does not render the prompt as a prefix of the full "
            "conversation; cannot separate the response for loss masking"
        )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = (p_ids + r_ids)[:max_len]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:max_len]
    if all(t == IGNORE for t in labels):
        return None
    return Encoded(ids, labels)


def encode_all(tokenizer, examples: list[Example], max_len: int) -> tuple[list[Encoded], int]:
    """(encoded examples, number dropped because truncation left no response)."""
    out, dropped = [], 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_len)
        if enc is None:
            dropped += 1
        else:
            out.append(enc)
    if not out:
        raise DataError(f"every example is longer than max_seq_len={max_len} before its response starts")
    return out, dropped


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both B x longest row: each row of token ids right-padded with
    ``pad_id``, attention 1 on its real tokens."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        attn[i, :len(x)] = 1
    return ids, attn


def collate(batch: list[Encoded], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (or to ``width``, at least that); padding has label -100
    and attention 0."""
    width = max([len(e.input_ids) for e in batch] + ([width] if width else []))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}
