"""Logits only where a loss reads them.

A causal LM computes hidden states h = decoder(x) (B x T x d), then logits = head(h)
(B x T x V). A loss over labelled tokens reads the logits at the positions that predict them,

    P = {(i, t) : labels[i, t + 1] != IGNORE}

and nowhere else; computing the output layer at every position costs B*T*d*V multiply-adds for
|P|*d*V useful ones (an anchor reads 16 of ~60 positions; SmolLM2's output layer is
V = 49,152 wide, a fifth of the model's weights).

:func:`labelled_logits` runs the decoder once and the output layer on the |P| kept hidden
states only, through the model's own ``logits_to_keep`` argument (a boolean B x T mask,
transformers >= 5; the model's own head, scaling and soft-capping apply). The rows come in
row-major order of P, the order of ``labels[:, 1:][labels[:, 1:] != IGNORE]``, so
``labelled_logits(model, batch)[k]`` is ``model(...).logits[:, :-1][sel][k]`` up to the
reassociation of the output layer's sums (tested within 1e-6). A model whose forward has no
``logits_to_keep`` gets the full logits, then the same rows.
"""

from __future__ import annotations

import inspect

import torch

from safecl.data.formatting import IGNORE


def _accepts_logits_to_keep(model) -> bool:
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model in .module
    cached = getattr(inner, "_safecl_logits_to_keep", None)
    if cached is None:
        try:
            cached = "logits_to_keep" in inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            cached = False
        try:
            inner._safecl_logits_to_keep = cached
        except AttributeError:
            pass
    return cached


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean B x T mask of P: True at t when the token at t + 1 is labelled."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def labelled_targets(labels: torch.Tensor) -> torch.Tensor:
    """The labelled tokens, in the row order of :func:`labelled_logits`."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE]


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """|P| x V logits at the positions that predict labelled tokens (see the module doc).

    ``batch``: ``input_ids``, ``attention_mask`` and ``labels`` (B x T, IGNORE where no loss)."""
    labels = batch["labels"]
    if _accepts_logits_to_keep(model):
        keep = predicting_positions(labels)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep).logits
        return logits.reshape(-1, logits.size(-1))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1][labels[:, 1:] != IGNORE]
