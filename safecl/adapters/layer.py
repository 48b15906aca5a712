"""The LoRI layer: a frozen linear plus a low-rank update whose B is split by stage.

Math, for a wrapped linear ``W`` (out x in) and rank ``r``::

    y = W x + s * B_eff (A x),        s = alpha / r
    A      : r x in     lora: trained; lori-*: frozen random projection (buffer), seeded per module
    B_eff  = B_frozen + (this stage's trainable part)
    dense  : B_eff = B_frozen + delta                       delta: out x r Parameter, starts at 0
    sparse : B_eff = B_frozen with entries ``index`` replaced by ``values``
             (values: Parameter of length nnz = mask entries, starts at B_frozen[index])

Invariants kept here:
- ``B_frozen`` is a buffer: no optimizer, weight decay or gradient can touch it. Earlier stages'
  entries change only through :meth:`commit_stage`, which writes this stage's entries.
- In sparse mode the only trainable tensor has one element per mask entry, so gradients and
  optimizer state scale with the mask, not with B; the mask is applied in the forward pass
  (a scatter), so isolation holds under DDP/FSDP/ZeRO without gradient hooks.
- For lori-* methods ``A`` never changes after creation.
- Teacher view: with ``stage_enabled`` False the layer computes ``W x + s * B_frozen A_start x``
  (``A_start`` = A when the stage began; it is A itself for lori-*), which is bit for bit the
  model before this stage. Safety anchors use it as a free, exact teacher.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def seeded_projection(seed: int, name: str, rank: int, in_features: int) -> torch.Tensor:
    """A (rank x in) drawn Kaiming-uniform (bound 1/sqrt(in), as PEFT's default A init) from a
    generator seeded by sha256(seed, module name): the same on every machine and rank."""
    digest = hashlib.sha256(f"safecl-A:{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class LoRILinear(nn.Module):
    """Wraps an ``nn.Linear`` (frozen) with a staged low-rank adapter (see module docstring)."""

    def __init__(self, base: nn.Linear, name: str, rank: int, alpha: float, seed: int,
                 train_A: bool = False, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.name = name
        self.rank = rank
        self.scaling = alpha / rank
        self.train_A = train_A
        A = seeded_projection(seed, name, rank, base.in_features)
        if train_A:
            self.A = nn.Parameter(A)
        else:
            self.register_buffer("A", A)
        self.register_buffer("B_frozen", torch.zeros(base.out_features, rank))
        self.register_buffer("index", torch.zeros(0, dtype=torch.long))
        self.delta: nn.Parameter | None = None
        self.values: nn.Parameter | None = None
        self.A_start: torch.Tensor | None = None  # lora: A when the stage began (teacher view)
        self.stage_enabled = True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.to(base.weight.device)

    # -- stage control ---------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "dense" if self.delta is not None else "sparse" if self.values is not None else "frozen"

    def begin_dense(self) -> None:
        """Train all of B (on top of B_frozen) this stage."""
        self._clear()
        self.delta = nn.Parameter(torch.zeros_like(self.B_frozen))
        if self.train_A:
            self.A_start = self.A.detach().clone()

    def begin_sparse(self, mask: torch.Tensor) -> None:
        """Train only the entries where ``mask`` (out x r, bool) is True."""
        if mask.shape != self.B_frozen.shape:
            raise ValueError(f"{self.name}: mask shape {tuple(mask.shape)} != B shape {tuple(self.B_frozen.shape)}")
        self._clear()
        self.index = mask.to(self.B_frozen.device).flatten().nonzero().squeeze(1)
        self.values = nn.Parameter(self.B_frozen.flatten()[self.index].clone())

    def commit_stage(self) -> None:
        """Fold this stage's trainable part into B_frozen and freeze it."""
        with torch.no_grad():
            self.B_frozen.copy_(self.effective_B())
        self._clear()

    def discard_stage(self) -> None:
        """Drop this stage's trainable part (B_frozen unchanged)."""
        self._clear()

    def _clear(self) -> None:
        self.delta = None
        self.values = None
        self.A_start = None
        self.stage_enabled = True
        self.index = torch.zeros(0, dtype=torch.long, device=self.B_frozen.device)

    # -- math ------------------------------------------------------------------------------
    def effective_B(self) -> torch.Tensor:
        if not self.stage_enabled:
            return self.B_frozen
        if self.delta is not None:
            return self.B_frozen + self.delta
        if self.values is not None:
            return self.B_frozen.flatten().scatter(0, self.index, self.values).view_as(self.B_frozen)
        return self.B_frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = W x + s B_eff (A x). With a frozen A (lori-*), no dropout and one dtype, as
        :class:`_MergedLinear`: one GEMM with W + s B_eff A, the cheapest exact form; otherwise
        (lora, dropout, a low-precision base) W x plus the low-rank product, s folded into B."""
        A = self.A if self.stage_enabled or self.A_start is None else self.A_start
        B = self.effective_B()
        w = self.base.weight
        if (not self.train_A and not w.requires_grad and isinstance(self.dropout, nn.Identity)
                and x.dtype == w.dtype == A.dtype):
            return _MergedLinear.apply(x, w, self.base.bias, A, B, self.scaling)
        y = self.base(x)
        h = F.linear(self.dropout(x).to(A.dtype), A)
        return y + F.linear(h, B * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"name={self.name}, rank={self.rank}, scaling={self.scaling:g}, train_A={self.train_A}, mode={self.mode}"


class _MergedLinear(torch.autograd.Function):
    """y = x (W + s B A)^T + bias for a frozen W and A, B trainable.

    Forward: W_eff = W + s B A (out x r x in multiply-adds, tiny next to the T x in x out of the
    product), then one GEMM; h = x A^T (T x r) is kept for the backward. Backward:
    dL/dx = g W_eff (W_eff recomputed, not kept: out x in floats per call would double the
    activation memory at scale) and dL/dB = s g^T h, one pass over g. Against W x + s B (A x)
    this saves the T x out intermediate, its sum with W x and, in the backward, the pass g B and
    the T x in sum into dL/dx. Same values up to float reassociation (tested within 1e-5)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling):
        h = F.linear(x, A)
        ctx.save_for_backward(h, weight, A, B)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, B, A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight, A, B = ctx.saved_tensors
        grad_x = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ torch.addmm(weight, B, A, alpha=ctx.scaling)
        if ctx.needs_input_grad[4]:
            grad_B = (grad.reshape(-1, grad.size(-1)).t() @ h.reshape(-1, h.size(-1))) * ctx.scaling
        return grad_x, None, None, None, grad_B, None
