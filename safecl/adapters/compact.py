"""The compact on-disk form of a LoRI-S run: owned B entries only, A rebuilt from its seed.

A LoRI-S adapter is mostly redundant on disk: every ``A`` is the frozen projection
``seeded_projection(seed, module, r, in)`` and every ``B`` is zero outside the stages' masks.
The compact form keeps only what cannot be recomputed. One safetensors file::

    metadata["safecl_compact"]   JSON header: format, version, seed, rank, alpha, targets,
                                 base model, dropout, modules [[name, out, in], ...] (in order),
                                 stages [{name, entries}], disjoint, dtypes, sha256 of all A
    stage.<t>.index   int32 (n_t,)   flat positions of stage t's entries in the concatenation
                                     of every module's B (row-major, modules in header order)
    stage.<t>.values  (n_t,)         the final B values at those positions

Stage ``t`` stores the entries of its mask that no later mask claims (with disjoint masks: its
whole mask), holding the run's FINAL values, so that::

    B_final = scatter(zeros, union_t index_t, values_t)           (bit for bit)
    A       = seeded_projection(seed, module, rank, in)           (checked against the sha256)

With disjoint masks (safecl's default) earlier stages' entries never change, so the
cumulative adapter after ANY stage k is the scatter of stages 0..k: one file holds every
stage's adapter (``load_compact(path, stage=k)``).

:func:`save_compact` refuses runs that do not fit the form (lora/lori-d, an A that is not the
seeded projection, a nonzero B entry outside every mask) and checks the round trip bit for
bit before it writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safecl.integrity import verify_run
from safecl.adapters.export import load_adapter_tensors, load_mask, module_name, peft_key, write_peft_adapter
from safecl.adapters.layer import seeded_projection
from safecl.errors import SafeclError

FORMAT = "safecl-lori-compact"
VERSION = 1
HEADER_KEY = "safecl_compact"
DEFAULT_NAME = "lori-compact.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike torch.equal, tells -0.0 from 0.0 and compares NaNs)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _a_digest(A: dict[str, torch.Tensor], names: list[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(A[n].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_compact(final: dict[str, torch.Tensor], masks: list[dict[str, torch.Tensor]], stage_names: list[str], *,
                  seed: int, rank: int, alpha: float, targets: list[str], base_model: str | None = None,
                  dropout: float = 0.0) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of the compact form of a final PEFT adapter and its stages' masks.

    ``final``: PEFT tensors (``...lora_A.weight`` / ``...lora_B.weight``) of the last stage.
    ``masks``: one bool mask per stage, keyed by module name (as ``export.load_mask`` returns).
    Raises SafeclError when an A is not the seeded projection or B is nonzero outside the masks.
    """
    A = {module_name(k): v for k, v in final.items() if k.endswith(".lora_A.weight")}
    B = {module_name(k): v for k, v in final.items() if k.endswith(".lora_B.weight")}
    names = sorted(A)
    if not names or set(A) != set(B) or len(final) != 2 * len(names):
        raise SafeclError("the adapter does not hold exactly one lora_A and one lora_B per module")
    for name in names:
        want = seeded_projection(seed, name, rank, A[name].shape[1]).to(A[name].dtype)
        if A[name].shape != want.shape or not torch.equal(A[name], want):
            raise SafeclError(f"module {name}: lora_A is not seeded_projection(seed={seed}, rank={rank}); the compact "
                              "form only fits lori-s runs (frozen seeded A)")
    for t, mask in enumerate(masks):
        for name in names:
            if name not in mask or tuple(mask[name].shape) != tuple(B[name].shape):
                raise SafeclError(f"stage {stage_names[t]}: mask lacks module {name} or has the wrong shape")
    flat_B = torch.cat([B[n].flatten() for n in names])
    flat_masks = [torch.cat([m[n].flatten().to(torch.bool).cpu() for n in names]) for m in masks]
    if flat_B.numel() >= 2 ** 31:
        raise SafeclError("adapter too large for int32 positions")
    claimed = torch.zeros_like(flat_B, dtype=torch.bool)
    owned: list[torch.Tensor] = [None] * len(masks)  # type: ignore[list-item]
    overlap = False
    for t in range(len(masks) - 1, -1, -1):  # the last stage that trained an entry holds it
        overlap |= bool((flat_masks[t] & claimed).any())
        owned[t] = flat_masks[t] & ~claimed
        claimed |= flat_masks[t]
    stray = ((flat_B != 0) | torch.signbit(flat_B)) & ~claimed  # -0.0 too: the rebuild must be bit-exact
    if stray.any():
        pos = int(stray.nonzero()[0])
        raise SafeclError(f"{int(stray.sum())} nonzero B entries lie outside every stage's mask (first at flat "
                          f"position {pos}); the compact form only fits lori-s runs")
    tensors: dict[str, torch.Tensor] = {}
    stages = []
    for t, own in enumerate(owned):
        index = own.nonzero().squeeze(1)
        tensors[f"stage.{t}.index"] = index.to(torch.int32).contiguous()
        tensors[f"stage.{t}.values"] = flat_B[index].contiguous()
        stages.append({"name": stage_names[t], "entries": int(index.numel()), "mask_entries": int(flat_masks[t].sum())})
    header = {
        "format": FORMAT, "version": VERSION, "seed": int(seed), "rank": int(rank), "alpha": float(alpha),
        "targets": sorted(targets), "base_model": base_model, "dropout": float(dropout),
        "modules": [[n, int(B[n].shape[0]), int(A[n].shape[1])] for n in names],
        "stages": stages, "disjoint": not overlap,
        "a_dtype": _dtype_name(A[names[0]].dtype), "b_dtype": _dtype_name(flat_B.dtype),
        "a_sha256": _a_digest(A, names),
    }
    return tensors, header


def expand(tensors: dict[str, torch.Tensor], header: dict, stage: int | None = None) -> dict[str, torch.Tensor]:
    """Dense PEFT tensors (keyed like adapter_model.safetensors) of the adapter after ``stage``
    (default: the last). Raises SafeclError for an earlier stage of a run whose masks overlap."""
    n_stages = len(header["stages"])
    last = n_stages - 1 if stage is None else stage
    if not -n_stages <= last < n_stages:
        raise SafeclError(f"stage {stage}: this file holds stages 0..{n_stages - 1}")
    last %= n_stages
    if last != n_stages - 1 and not header["disjoint"]:
        raise SafeclError("the masks of this run overlap (adapter.disjoint=false): only the final adapter can be "
                          "rebuilt, earlier stages' entries were overwritten")
    modules = header["modules"]
    total = sum(o * header["rank"] for _, o, _ in modules)
    flat_B = torch.zeros(total, dtype=DTYPES[header["b_dtype"]])
    for t in range(last + 1):
        flat_B[tensors[f"stage.{t}.index"].long()] = tensors[f"stage.{t}.values"]
    out, offset, A = {}, 0, {}
    for name, o, i in modules:
        A[name] = seeded_projection(header["seed"], name, header["rank"], i).to(DTYPES[header["a_dtype"]])
        out[peft_key(name, "A")] = A[name]
        out[peft_key(name, "B")] = flat_B[offset:offset + o * header["rank"]].view(o, header["rank"]).clone()
        offset += o * header["rank"]
    if _a_digest(A, [m[0] for m in modules]) != header["a_sha256"]:
        raise SafeclError("the rebuilt A projections differ from the ones this file was made from "
                          "(safecl's seeded_projection changed?); cannot rebuild the adapter bit for bit")
    return out


def read_compact_header(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if HEADER_KEY not in meta:
        raise SafeclError(f"{path}: not a safecl compact adapter (no '{HEADER_KEY}' header)")
    header = json.loads(meta[HEADER_KEY])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise SafeclError(f"{path}: format {header.get('format')} v{header.get('version')}, "
                          f"expected {FORMAT} v{VERSION}")
    return header


def load_compact(path: str | Path, stage: int | None = None) -> dict[str, torch.Tensor]:
    """Dense A/B of the adapter after ``stage`` (default: last), keyed by PEFT tensor name: equal,
    bit for bit, to that stage's ``adapter/adapter_model.safetensors``."""
    header = read_compact_header(path)
    return expand(load_file(str(path)), header, stage)


def write_compact(tensors: dict[str, torch.Tensor], header: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt", HEADER_KEY: json.dumps(header)})
    os.replace(tmp, path)
    return path


def _run_stages(run_dir: Path) -> list[Path]:
    stages = sorted(d for d in (run_dir / "stages").glob("*") if (d / "adapter" / "adapter_config.json").is_file())
    if not stages:
        raise SafeclError(f"{run_dir}: no stages/NN-name/adapter/ found; is this a safecl run directory?")
    for d in stages:
        if not (d / "mask.safetensors").is_file():
            raise SafeclError(f"{d}: no mask.safetensors; the compact form needs a lori-s run (every stage masked)")
    return stages


def save_compact(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write the compact form of the finished lori-s run in ``run_dir`` (default path:
    ``<run_dir>/lori-compact.safetensors``); checks the round trip against the final adapter."""
    run_dir = Path(run_dir)
    resolved = run_dir / "recipe.resolved.yaml"
    if not resolved.is_file():
        raise SafeclError(f"{run_dir}: no recipe.resolved.yaml; is this a safecl run directory?")
    recipe = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    adapter = recipe.get("adapter", {})
    if adapter.get("method") != "lori-s":
        raise SafeclError(f"{run_dir}: adapter.method is {adapter.get('method')!r}; the compact form is for lori-s "
                          "runs (lora trains A, lori-d has a dense B)")
    seed = recipe["seed"] if adapter.get("seed") is None else adapter["seed"]
    stages = _run_stages(run_dir)
    verify_run(run_dir, only=stages)
    config = json.loads((stages[-1] / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    final = load_adapter_tensors(stages[-1] / "adapter")
    masks = [load_mask(d / "mask.safetensors") for d in stages]
    names = [d.name.split("-", 1)[-1] for d in stages]
    targets = config["target_modules"]
    tensors, header = build_compact(final, masks, names, seed=seed, rank=int(config["r"]),
                                    alpha=float(config["lora_alpha"]),
                                    targets=[targets] if isinstance(targets, str) else list(targets),
                                    base_model=config.get("base_model_name_or_path"),
                                    dropout=float(config.get("lora_dropout") or 0.0))
    rebuilt = expand(tensors, header)
    if rebuilt.keys() != final.keys() or not all(bits_equal(rebuilt[k], final[k]) for k in final):
        raise SafeclError(f"{run_dir}: the compact form does not rebuild the final adapter bit for bit; not written")
    return write_compact(tensors, header, run_dir / DEFAULT_NAME if path is None else path)


def compact_to_peft(path: str | Path, out: str | Path, stage: int | None = None) -> Path:
    """Expand a compact file into a PEFT LoRA adapter directory (written atomically)."""
    header = read_compact_header(path)
    return write_peft_adapter(load_compact(path, stage), out, rank=header["rank"], alpha=header["alpha"],
                              targets=header["targets"], base_model=header["base_model"], dropout=header["dropout"])


# -- command line ----------------------------------------------------------------------------

COMPACT_HELP = "Store a lori-s run compactly (owned B entries only), or expand that file to a PEFT adapter."
COMPACT_EPILOG = f"""\
A lori-s adapter's A is a seeded random projection and its B is zero outside the stages' masks,
so the compact file keeps only each stage's owned B values and their int32 positions (about
8 bytes per trained entry) plus a JSON header; A is rebuilt from the seed. Expanding gives the
PEFT adapter back bit for bit, for the last stage or (disjoint masks) any earlier one.

examples:
  safecl compact runs/quickstart                      -> runs/quickstart/{DEFAULT_NAME}
  safecl compact runs/quickstart/{DEFAULT_NAME} --out adapters/final
  safecl compact runs/quickstart/{DEFAULT_NAME} --stage 0 --out adapters/safety-only
"""


def configure_compact_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = p.description or COMPACT_HELP
    p.epilog = p.epilog or COMPACT_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source", metavar="RUN_DIR|FILE",
                   help="a finished lori-s run directory (compress) or a compact file (expand)")
    p.add_argument("--out", default=None, help=f"compress: output file (default RUN_DIR/{DEFAULT_NAME}); "
                   "expand: PEFT adapter directory (required)")
    p.add_argument("--stage", type=int, default=None, help="expand: adapter after this stage index (default: last)")
    p.set_defaults(func=cmd_compact)
    return p


def cmd_compact(args) -> int:
    src = Path(args.source)
    if src.is_dir():
        out = save_compact(src, args.out)
        h = read_compact_header(out)
        print(f"[safecl] compact adapter ({len(h['stages'])} stages, "
              f"{sum(s['entries'] for s in h['stages'])} B entries) -> {out} ({out.stat().st_size:,} bytes)")
        return 0
    if not src.is_file():
        raise SafeclError(f"{src}: no such run directory or compact file")
    if args.out is None:
        raise SafeclError("expanding a compact file needs --out DIR for the PEFT adapter")
    out = compact_to_peft(src, args.out, args.stage)
    print(f"[safecl] expanded {src} -> PEFT adapter {out}")
    return 0
