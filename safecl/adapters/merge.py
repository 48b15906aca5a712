"""Merging PEFT LoRA adapters (task adapters trained in separate runs), as in LoRI's merging.

Adapter ``i`` has ``A_i`` (r_i x in), ``B_i`` (out x r_i) and scale ``s_i`` (``lora_alpha / r``,
or ``lora_alpha / sqrt(r)`` with ``use_rslora``) per module, so it adds ``s_i B_i A_i`` to ``W``.
Both methods write one PEFT LoRA adapter with weights ``w_i``:

concat (ranks stacked; LoRI's "concatenated" merge)::

    A = vstack(A_1, ..., A_n)                     (r_1 + ... + r_n) x in
    B = hstack(c_1 B_1, ..., c_n B_n)             c_i = w_i * s_i / s
    s * B A = sum_i w_i s_i B_i A_i               exactly: no cross terms

linear (A and B averaged separately; same rank r required)::

    A = sum_i w_i A_i,   B = sum_i w_i (s_i / s) B_i
    s * B A = sum_i sum_j w_i w_j s_i B_i A_j     every CROSS TERM B_i A_j (i != j) is interference,
                                                  and the own term carries w_i^2, not w_i

Output scale ``s``: the adapters' common scale when they all share one (then ``c_i = w_i``
and, with weights 1, B is copied unchanged), else 1. The result has ``lora_alpha = s * r_out``
and ``use_rslora = false``; ``rank_pattern``/``alpha_pattern`` inputs are refused.

For LoRI adapters trained with the same ``adapter.seed`` every ``A_i`` is the same frozen
projection ``A``; then linear gives ``(sum_j w_j) * s * sum_i w_i B_i A``, i.e. concat's delta
times ``sum w`` (equal to it when the weights sum to 1), without stacking ranks.

PEFT's own ``add_weighted_adapter`` differs for linear: it scales A and B by
``sqrt(w_i * s_i)`` each (own term ``w_i s_i B_i A_i``, cross terms ``sqrt(w_i w_j s_i s_j)``).

Defaults: weights 1.0 each for concat (the sum of the task deltas, each at full strength),
1/n each for linear (the average). Inputs must adapt the same modules with the same shapes.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from safecl.adapters.export import module_name, peft_key, read_safetensors
from safecl.atomic import atomic_directory
from safecl.errors import SafeclError
from safecl.integrity import verify_adapter

METHODS = ("concat", "linear")
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class Adapter:
    """One PEFT LoRA adapter read from disk: ``A[module]`` (r x in), ``B[module]`` (out x r)."""

    path: Path
    config: dict
    rank: int
    scale: float
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter directory, a safecl stage directory (its ``adapter/``) or a safecl run directory
    (its last stage's ``adapter/``)."""
    p = Path(path)
    if (p / CONFIG).is_file():
        return p
    if (p / "adapter" / CONFIG).is_file():
        return p / "adapter"
    stages = sorted(d for d in (p / "stages").glob("*") if (d / "adapter" / CONFIG).is_file()) if p.is_dir() else []
    if stages:
        return stages[-1] / "adapter"
    raise SafeclError(f"{p}: not a PEFT adapter directory (no {CONFIG}), nor a safecl stage or run directory")


def read_adapter(path: str | Path) -> Adapter:
    """Read and check a PEFT LoRA adapter; raises SafeclError naming the directory on anything
    that cannot be merged (not LoRA, DoRA, per-module rank/alpha, extra tensors)."""
    d = resolve_adapter_dir(path)
    verify_adapter(d)  # a stage of a safecl run: its files as committed
    try:
        config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
        tensors = read_safetensors(d / WEIGHTS)
    except FileNotFoundError:
        raise SafeclError(f"{d}: missing {WEIGHTS}") from None
    except (json.JSONDecodeError, OSError) as exc:
        raise SafeclError(f"{d}: cannot read adapter: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise SafeclError(f"{d}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise SafeclError(f"{d}: DoRA adapters (use_dora) cannot be merged by stacking A and B")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SafeclError(f"{d}: per-module rank_pattern/alpha_pattern is not supported by safecl merge")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    A, B = {}, {}
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            A[module_name(key)] = t
        elif key.endswith(".lora_B.weight"):
            B[module_name(key)] = t
        else:
            raise SafeclError(f"{d}: tensor {key!r} is not a LoRA A/B weight (bias, embedding or "
                              "modules_to_save adapters cannot be merged)")
    odd = sorted(set(A) ^ set(B))
    if odd:
        raise SafeclError(f"{d}: module {odd[0]} has only one of lora_A / lora_B")
    for name in A:
        a, b = A[name], B[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise SafeclError(f"{d}: module {name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match r={rank}")
    return Adapter(d, config, rank, scale, A, B)


def check_compatible(adapters: list[Adapter]) -> None:
    """Same modules, same in/out shapes, same fan_in_fan_out: else SafeclError naming dir and module."""
    ref = adapters[0]
    for ad in adapters[1:]:
        missing, extra = sorted(set(ref.A) - set(ad.A)), sorted(set(ad.A) - set(ref.A))
        if missing or extra:
            what = f"lacks module {missing[0]}" if missing else f"has extra module {extra[0]}"
            raise SafeclError(f"{ad.path} {what} (compared with {ref.path}); merged adapters must adapt the same "
                              f"modules ({len(missing)} missing, {len(extra)} extra)")
        for name in sorted(ref.A):
            want = (ref.B[name].shape[0], ref.A[name].shape[1])
            got = (ad.B[name].shape[0], ad.A[name].shape[1])
            if want != got:
                raise SafeclError(f"{ad.path}: module {name} is {got[0]}x{got[1]} (out x in) but {want[0]}x{want[1]} "
                                  f"in {ref.path}: adapters of different base models cannot be merged")
        if bool(ad.config.get("fan_in_fan_out")) != bool(ref.config.get("fan_in_fan_out")):
            raise SafeclError(f"{ad.path}: fan_in_fan_out differs from {ref.path}")


def default_weights(method: str, n: int) -> list[float]:
    return [1.0] * n if method == "concat" else [1.0 / n] * n


def merge_tensors(adapters: list[Adapter], weights: list[float],
                  method: str) -> tuple[dict[str, torch.Tensor], int, float]:
    """(PEFT tensors of the merged adapter, its rank, its scale); see the module docstring."""
    if method not in METHODS:
        raise SafeclError(f"merge method {method!r}: choose one of {', '.join(METHODS)}")
    if len(weights) != len(adapters):
        raise SafeclError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if method == "linear" and len({a.rank for a in adapters}) > 1:
        ranks = ", ".join(f"{a.path}: r={a.rank}" for a in adapters)
        raise SafeclError(f"linear merge needs adapters of the same rank ({ranks}); use --method concat, "
                          "which stacks ranks")
    check_compatible(adapters)
    scales = {a.scale for a in adapters}
    scale = scales.pop() if len(scales) == 1 else 1.0
    coef = [w * a.scale / scale for w, a in zip(weights, adapters)]
    dtypes = {t.dtype for a in adapters for t in (*a.A.values(), *a.B.values())}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    out: dict[str, torch.Tensor] = {}
    for name in sorted(adapters[0].A):
        As = [a.A[name].float() for a in adapters]
        Bs = [a.B[name].float() for a in adapters]
        if method == "concat":
            A = torch.cat(As, dim=0)
            B = torch.cat([c * b for c, b in zip(coef, Bs)], dim=1)
        else:
            A = sum(w * a for w, a in zip(weights, As))
            B = sum(c * b for c, b in zip(coef, Bs))
        out[peft_key(name, "A")] = A.to(dtype).contiguous()
        out[peft_key(name, "B")] = B.to(dtype).contiguous()
    rank = sum(a.rank for a in adapters) if method == "concat" else adapters[0].rank
    return out, rank, scale


def merge_adapters(dirs: list[str | Path], weights: list[float] | None, method: str, out: str | Path) -> Path:
    """Merge the PEFT LoRA adapters in ``dirs`` into one PEFT LoRA adapter at ``out``.

    ``dirs``: adapter directories (or safecl stage/run directories, see :func:`resolve_adapter_dir`).
    ``weights``: one per adapter, None for the default (concat 1.0 each, linear 1/n each).
    ``method``: ``concat`` (exact sum of weighted deltas) or ``linear`` (cross terms; same rank).
    Writes ``adapter_config.json`` + ``adapter_model.safetensors`` atomically (temp dir, rename);
    ``out`` may be an existing adapter directory (replaced) but not one of the inputs.
    Raises SafeclError for fewer than 2 adapters, mismatched modules/shapes, bad weights.
    """
    if len(dirs) < 2:
        raise SafeclError("merge needs at least two adapters")
    adapters = [read_adapter(d) for d in dirs]
    weights = default_weights(method, len(adapters)) if weights is None else [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise SafeclError(f"merge weights must be finite numbers, got {weights}")
    tensors, rank, scale = merge_tensors(adapters, weights, method)
    out = Path(out)
    if any(out.resolve() == a.path.resolve() for a in adapters):
        raise SafeclError(f"--out {out} is one of the input adapters; choose a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG).is_file())):
        raise SafeclError(f"--out {out} exists and is not an adapter directory; choose a new directory")
    config = dict(adapters[0].config)
    config.update(r=rank, lora_alpha=scale * rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    bases = sorted({str(a.config.get("base_model_name_or_path")) for a in adapters})
    info = {"merge": {"method": method, "weights": weights, "scale": scale, "rank": rank,
                      "adapters": [str(a.path) for a in adapters], "base_models": bases}}
    with atomic_directory(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", "safecl": json.dumps(info)})
    return out


# -- command line ----------------------------------------------------------------------------

MERGE_HELP = "Merge LoRA adapters (e.g. task adapters from separate runs) into one PEFT adapter."
MERGE_EPILOG = """\
methods:
  concat  stack the ranks: A = [A_1; ...; A_n], B = [c_1 B_1, ..., c_n B_n], c_i = w_i * s_i / s.
          The merged update is exactly sum_i w_i * s_i * B_i A_i (s_i = alpha_i / r_i; s = the
          adapters' common scale, else 1): no interference between adapters.
          Rank of the result = sum of ranks. Default weights: 1.0 each.
  linear  average the factors: A = sum_i w_i A_i, B = sum_i w_i B_i (same rank required). Cheaper
          (rank stays r) but adds cross terms B_i A_j between adapters and weights each own term
          by w_i^2. Default weights: 1/n each. For LoRI adapters that share adapter.seed (same A),
          linear with weights summing to 1 equals concat.

ADAPTER_DIR may be a PEFT adapter directory, a safecl stage directory (stages/NN-name) or a
safecl run directory (its last stage's adapter). Load the result with
peft.PeftModel.from_pretrained(base_model, OUT).

examples:
  safecl merge runs/math/stages/01-arithmetic runs/senti/stages/01-sentiment --out merged/cat
  safecl merge runs/a runs/b --method linear --weights 0.7,0.3 --out merged/lin
"""


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: comma-separated numbers, e.g. 0.5,0.5") from None


def configure_merge_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``safecl merge``; pass a subparser made with RawDescriptionHelpFormatter."""
    p.description = p.description or MERGE_HELP
    p.epilog = p.epilog or MERGE_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                   help="two or more adapters (PEFT adapter, safecl stage or run directories)")
    p.add_argument("--method", choices=METHODS, default="concat",
                   help="concat: exact sum of deltas, ranks add up (default); linear: average A and B, cross terms")
    p.add_argument("--weights", type=_weights, default=None, metavar="W1,W2,...",
                   help="one weight per adapter (default: 1.0 each for concat, 1/n each for linear)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the merged PEFT adapter")
    p.set_defaults(func=cmd_merge)
    return p


def cmd_merge(args) -> int:
    out = merge_adapters(args.adapters, args.weights, args.method, args.out)
    info = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    print(f"[safecl] merged {len(args.adapters)} adapters ({args.method}) -> {out} "
          f"(r={info['r']}, lora_alpha={info['lora_alpha']:g})")
    return 0
