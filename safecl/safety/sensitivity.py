"""Per-entry safety sensitivity of B, for safety-aware mask allocation.

At the model before a task stage (delta = 0 on every module, A frozen), the refusal
log-likelihood of anchor prompts x_i with the teacher's responses y_i (the model's own
refusals and helpful answers, see safecl.safety.anchors) is

    LL = sum_i sum_{t < tokens} log p(y_i,t | x_i, y_i,<t)

and the sensitivity of entry (o, k) of module m is its empirical Fisher over anchor batches,

    S_m[o, k] = sum_batches ( dLL_batch / dB_m[o, k] )^2,

the second-order change of LL when that entry moves. Cost: one forward + backward per anchor
batch, once per stage. Entries with small S can take task updates with least effect on how
the model answers the anchors; :func:`safecl.adapters.allocation.safety_aware_scores` trades
them off against the task's own scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safecl.data.formatting import IGNORE, Encoded, collate


def safety_sensitivity(model, layers: dict, anchors: list[Encoded], pad_id: int, batch_size: int = 4) -> dict:
    """S_m (out x r, float32, CPU) per module name; leaves every layer frozen again."""
    for layer in layers.values():
        layer.begin_dense()
    fisher = {name: torch.zeros_like(layer.delta, device="cpu") for name, layer in layers.items()}
    was_training = model.training
    model.eval()  # no dropout: the sensitivity of the model as it answers
    dev = next(model.parameters()).device
    try:
        for start in range(0, len(anchors), batch_size):
            batch = {k: v.to(dev) for k, v in collate(anchors[start:start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            ll = -F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                  ignore_index=IGNORE, reduction="sum")
            grads = torch.autograd.grad(ll, [layer.delta for layer in layers.values()])
            for name, g in zip(layers, grads):
                fisher[name] += g.detach().float().cpu().pow(2)
    finally:
        for layer in layers.values():
            layer.discard_stage()
        model.train(was_training)
    return fisher
