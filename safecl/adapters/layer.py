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
        """y = W x + s B_eff (A x). With a frozen base, no dropout and one dtype, through
        :class:`_LowRankLinear` (the low-rank term added in place, a hand-written backward);
        otherwise (dropout, a low-precision base) W x plus the low-rank product by autograd."""
        A = self.A if self.stage_enabled or self.A_start is None else self.A_start
        B = self.effective_B()
        w = self.base.weight
        if not w.requires_grad and isinstance(self.dropout, nn.Identity) and x.dtype == w.dtype == A.dtype:
            return _LowRankLinear.apply(x, w, self.base.bias, A, B, self.scaling)
        y = self.base(x)
        h = F.linear(self.dropout(x).to(A.dtype), A)
        return y + F.linear(h, B * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"name={self.name}, rank={self.rank}, scaling={self.scaling:g}, train_A={self.train_A}, mode={self.mode}"


class _LowRankLinear(torch.autograd.Function):
    """y = x W^T + bias + s (x A^T) B^T for a frozen W; B (and A, for lora) trainable.

    Forward: h = x A^T (T x r), y = x W^T + bias, then y += s h B^T in place (one addmm into
    the output the base GEMM just wrote: no T x out temporary, no W + s B A built). Backward,
    g = dL/dy::

        dL/dx = g W + s (g B) A        (g W is the frozen model's own input gradient)
        dL/dB = s (h^T g)^T            dL/dA = s (g B)^T x   (lora only; x kept only then)

    Why not one GEMM with W_eff = W + s B A (the form used before): building W_eff is an
    out x in pass with an inner dimension of r, which BLAS runs far below its GEMM speed, and the
    backward must build it again. Measured on SmolLM2-135M's seven projection shapes, 2 threads,
    800 tokens: forward + backward of the adapted projections 1.56x the frozen projections' with
    W_eff, 1.15x with this form (1.61x / 1.20x at 240 tokens, 2.67x / 1.32x at 16). Same values
    as W x + s B (A x) up to float reassociation (tested within 1e-5)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling):
        x2 = x.reshape(-1, x.size(-1))
        h = x2 @ A.t()
        y = F.linear(x2, weight, bias)
        y.addmm_(h, B.t(), alpha=scaling)
        ctx.save_for_backward(h, weight, A, B, x2 if A.requires_grad else None)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, grad):
        h, weight, A, B, x2 = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1))
        s = ctx.scaling
        grad_x = grad_A = grad_B = None
        gB = g @ B if (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]) else None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gB, A, alpha=s).view(*grad.shape[:-1], weight.size(1))
        if ctx.needs_input_grad[3]:
            grad_A = (gB.t() @ x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_B = (h.t() @ g).t().mul_(s)  # (h^T g)^T: BLAS runs this 2.4x faster than g^T h
        return grad_x, None, None, grad_A, grad_B, None
