"""The refusal direction (Arditi et al., 2024, "Refusal in language models is mediated by a
single direction"), per layer, and projections onto it.

For a prompt p rendered with the chat template (assistant opening added), let h_l(p) be the
hidden state at its LAST token after block l (l = 0 is the embedding output). With harmful
prompts H and harmless prompts B (held-in sets, never the retention check's)::

    r_l = mean_{p in H} h_l(p) - mean_{p in B} h_l(p)            (difference of means)
    proj_l(p) = h_l(p) . r_l / |r_l|                             (scalar projection)
    sep_l = (mean_H proj_l - mean_B proj_l) / pooled std of proj_l

``best_layer`` = argmax sep_l: where harmful and harmless prompts are best told apart. One
forward pass per prompt batch, no generation. The file (safetensors) holds ``direction``
(L+1 x hidden), ``separation`` (L+1), ``harmful_mean`` and ``harmless_mean`` projections (L+1),
and the metadata ``best_layer``, ``n_harmful``, ``n_harmless``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safecl.atomic import atomic_file
from safecl.data.formatting import pad_right, render


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def last_token_states(model, tokenizer, prompts: list[list[dict]], batch_size: int = 8) -> torch.Tensor:
    """Hidden states at each prompt's last token, every layer: (L+1, N, hidden), float32.

    Right padding; the last real token is found from the attention mask, so batching does
    not change a prompt's states beyond float rounding.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [tokenizer(render(tokenizer, conv, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for conv in prompts[start:start + batch_size]]
            input_ids, attn = pad_right(ids, pad)
            dev = _device(model)
            hs = model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=True).hidden_states
            last = (attn.sum(1) - 1).to(dev)
            rows = torch.arange(len(ids), device=dev)
            out.append(torch.stack([h[rows, last].float().cpu() for h in hs]))
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)


def unit(direction: torch.Tensor) -> torch.Tensor:
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def project(states: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Scalar projections (L+1, N) of states (L+1, N, H) onto each layer's unit direction (L+1, H)."""
    return torch.einsum("lnh,lh->ln", states, unit(direction).to(states.dtype))


def refusal_direction(model, tokenizer, harmful: list[list[dict]], harmless: list[list[dict]],
                      batch_size: int = 8) -> dict:
    """The direction and its statistics (see module doc) as a dict of tensors plus ``best_layer``."""
    if not harmful or not harmless:
        raise ValueError("the refusal direction needs harmful and harmless prompts (got "
                         f"{len(harmful)} and {len(harmless)})")
    h = last_token_states(model, tokenizer, harmful, batch_size)
    b = last_token_states(model, tokenizer, harmless, batch_size)
    direction = h.mean(1) - b.mean(1)
    ph, pb = project(h, direction), project(b, direction)
    pooled = torch.sqrt((ph.var(1, unbiased=False) + pb.var(1, unbiased=False)) / 2).clamp_min(1e-6)
    separation = (ph.mean(1) - pb.mean(1)) / pooled
    return {"direction": direction, "separation": separation, "harmful_mean": ph.mean(1),
            "harmless_mean": pb.mean(1), "best_layer": int(separation[1:].argmax()) + 1,
            "n_harmful": len(harmful), "n_harmless": len(harmless)}


def save_direction(path: Path, info: dict) -> None:
    tensors = {k: v.contiguous() for k, v in info.items() if torch.is_tensor(v)}
    meta = {k: str(v) for k, v in info.items() if not torch.is_tensor(v)}
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_direction(path: Path) -> dict:
    from safetensors import safe_open

    info: dict = dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        for k, v in (f.metadata() or {}).items():
            info[k] = int(v)
    return info
