"""Post-stage safety merge: scale a stage's own entries down where its update conflicts with
the safety stage's (data-free; SafeMERGE, arXiv 2503.17239, does this layer-wise with a
safety LoRA).

Per adapted module, with the frozen projection A (r x in) shared by every stage, the stage's
part P (out x r: its own entries of B) and the safety stage's part S::

    dW_stage = s * P A,   dW_safety = s * S A
    cos = <P A, S A>_F / (|P A|_F |S A|_F) = tr(P^T S G) / sqrt(tr(P^T P G) tr(S^T S G)),  G = A A^T

(r x r Gram matrix: no out x in product is formed). In modules with cos < threshold the
stage's entries are multiplied by ``scale``; every other entry of B (earlier stages', free
ones) is left bit-identical, and the stage keeps its mask: sparsity holds (Safe LoRA's dense
projection would break it). Cost: O(out * r^2) per module, milliseconds.
"""

from __future__ import annotations

import torch


def update_cosine(P: torch.Tensor, S: torch.Tensor, A: torch.Tensor) -> float:
    """cos(P A, S A) in Frobenius inner product; 0 when either update is zero."""
    G = (A.float() @ A.float().T)
    P, S = P.float(), S.float()
    cross = torch.sum((P.T @ S) * G)
    norm = torch.sqrt(torch.sum((P.T @ P) * G).clamp_min(0) * torch.sum((S.T @ S) * G).clamp_min(0))
    return float(cross / norm) if float(norm) > 0 else 0.0


def merge_conflicts(B: dict[str, torch.Tensor], A: dict[str, torch.Tensor], stage_part: dict[str, torch.Tensor],
                    safety_part: dict[str, torch.Tensor], threshold: float, scale: float) -> dict:
    """Scale, in place in ``B``, the stage's part in conflicting modules.

    ``stage_part[m]`` / ``safety_part[m]``: the two parts of module m's B as tensors (out x r);
    the stage's part must be zero outside the stage's entries, so that B - (1 - scale) * P
    changes only those entries. Returns {module: cosine} for every module and the scaled names.
    """
    cosines, scaled = {}, []
    for name in sorted(B):
        P = stage_part[name].to(B[name].device, B[name].dtype)
        cos = update_cosine(P, safety_part[name], A[name])
        cosines[name] = cos
        if cos < threshold and bool(P.any()):
            with torch.no_grad():
                B[name].sub_((1.0 - scale) * P)
            scaled.append(name)
    return {"cosines": cosines, "scaled": scaled}
