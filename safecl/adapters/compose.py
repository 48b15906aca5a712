"""Any subset of a run's stages as one PEFT LoRA adapter (``safecl compose``).

Every stage of a LoRI run adds its own part to one shared B over one frozen A (the seeded
projection, the same for every stage), so the run's adapter is a sum of per-stage parts and
any subset of stages can be cut out of it::

    B_run = sum_t P_t          the adapter after the last stage (stages/NN-last/adapter)
    B_S   = sum_{t in S} P_t   the composed adapter of the stages S; A unchanged

lori-s: the stages' masks M_t (``stages/NN-name/mask.safetensors``) are disjoint and an entry
never moves after its stage, so ``P_t = B_run * M_t`` and::

    B_S = where(union_{t in S} M_t, B_run, 0)          bit for bit, no arithmetic

Composing every stage gives the run's adapter bit for bit; composing the first k stages gives
the adapter saved after stage k bit for bit. A run whose masks overlap (``adapter.disjoint:
false``) or whose B is nonzero outside every mask is refused: its parts are not separable.

lori-d: B is dense in every stage, so a stage's part is what its stage added::

    P_t = B_t - B_(t-1)        B_t = the cumulative adapter after stage t (B_(-1) = 0)

A prefix of stages (the first k) is taken as the saved ``B_(k-1)`` (bit for bit); any other
subset is ``sum_{t in S} P_t``, summed in float64 and rounded once to B's dtype (equal to the
exact sum up to that one rounding). Every stage's A must be the same tensor, bit for bit.

lora: A trains in every stage with B, so the adapter after stage t is ``B_t A_t`` with both
factors changed; no stage's contribution can be separated. Refused.

Stage entries come from ``run.json`` in run order: repair passes (``repair_of``) are stages of
their own, composable by their names (``gsm8k.repair1``); a rolled-back stage (``rolled_back``:
the gate restored the previous adapter) holds no entries of the run's adapter and cannot be
composed (its mask is kept only as a record, ``mask.rolled_back.safetensors``).

Removing a stage is exact in the parameters only: stages trained after it were trained with it
present, so the composed model's behaviour has to be measured (``safecl check``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from safecl import __version__
from safecl.adapters.compact import DEFAULT_NAME, bits_equal, build_compact, expand, write_compact
from safecl.adapters.export import load_adapter_tensors, load_mask, module_name, write_peft_adapter
from safecl.atomic import atomic_directory
from safecl.errors import SafeclError

PROVENANCE = "provenance.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
METHODS = ("lori-s", "lori-d")


@dataclass
class StageEntry:
    """One entry of run.json's stage list (a recipe stage or a repair pass)."""

    index: int
    name: str
    dir: Path
    rolled_back: bool = False
    repair_of: str | None = None

    @property
    def adapter(self) -> Path:
        return self.dir / "adapter"

    @property
    def mask(self) -> Path:
        return self.dir / "mask.safetensors"

    def label(self) -> str:
        if self.rolled_back:
            return f"{self.name} (rolled back)"
        return f"{self.name} (repair of {self.repair_of})" if self.repair_of else self.name


@dataclass
class RunStages:
    """What compose needs of a run directory: its method, status, and stages in run order."""

    dir: Path
    method: str
    status: str
    model: str | None
    entries: list[StageEntry]
    recipe: dict = field(default_factory=dict)

    @property
    def live(self) -> list[StageEntry]:
        """Stages whose entries are in the run's adapter (not rolled back), in run order."""
        return [e for e in self.entries if not e.rolled_back]

    def names(self) -> str:
        return ", ".join(e.label() for e in self.entries)


@dataclass
class Composition:
    """The composed adapter: PEFT tensors and what went into them."""

    run: RunStages
    selected: list[StageEntry]
    tensors: dict[str, torch.Tensor]
    config: dict  # the source adapter's adapter_config.json
    entries: dict[str, int]  # stage name -> B entries of its part (lori-s: mask size; lori-d: nonzero)
    sources: list[Path]  # files read
    exact: str  # how exact the result is, in words
    masks: list[dict[str, torch.Tensor]] | None = None  # lori-s: the selected stages' masks


def read_run(run_dir: str | Path) -> RunStages:
    """The stages of a safecl run directory (from run.json); SafeclError if it is not one."""
    d = Path(run_dir)
    if not d.is_dir():
        raise SafeclError(f"{d}: no such run directory")
    if not (d / "run.json").is_file():
        raise SafeclError(f"{d}: no run.json; is this a safecl run directory (a recipe's output_dir)?")
    try:
        info = json.loads((d / "run.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SafeclError(f"{d / 'run.json'}: not valid JSON ({exc})") from None
    recipe = {}
    if (d / "recipe.resolved.yaml").is_file():
        recipe = yaml.safe_load((d / "recipe.resolved.yaml").read_text(encoding="utf-8")) or {}
    method = info.get("method") or recipe.get("adapter", {}).get("method")
    entries = []
    for e in info.get("stages") or []:
        sdir = d / (e.get("dir") or f"stages/{int(e['index']):02d}-{e['name']}")
        entries.append(StageEntry(int(e.get("index", len(entries))), str(e["name"]), sdir,
                                  bool(e.get("rolled_back")), e.get("repair_of")))
    if not entries:
        raise SafeclError(f"{d}: run.json lists no finished stage (status {info.get('status')!r})")
    for e in entries:
        if not (e.adapter / CONFIG).is_file():
            raise SafeclError(f"{e.adapter}: missing {CONFIG}; the run directory is incomplete")
    return RunStages(d, str(method), str(info.get("status")), info.get("model"), entries, recipe)


def parse_stages(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SafeclError("--stages: give stage names separated by commas, e.g. --stages safety,arithmetic")
    return names


def select(run: RunStages, names: list[str]) -> list[StageEntry]:
    """The named stages in run order (``all``: every stage not rolled back); SafeclError for an
    unknown or rolled-back name, listing the run's stages."""
    if names == ["all"]:
        return run.live
    by_name = {e.name: e for e in run.entries}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SafeclError(f"unknown stage {unknown[0]!r} in --stages; the stages of {run.dir} are: {run.names()}")
    rolled = [n for n in names if by_name[n].rolled_back]
    if rolled:
        raise SafeclError(f"stage {rolled[0]!r} was rolled back by the retention gate: the run's adapter holds none "
                          f"of its entries (its mask is kept only as a record, mask.rolled_back.safetensors); leave it "
                          f"out. Stages: {run.names()}")
    wanted = set(names)
    return [e for e in run.entries if e.name in wanted]


def _split(tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict, dict]:
    A = {module_name(k): v for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    B = {module_name(k): v for k, v in tensors.items() if k.endswith(".lora_B.weight")}
    if not A or set(A) != set(B) or len(tensors) != 2 * len(A):
        raise SafeclError(f"{where}: the adapter does not hold exactly one lora_A and one lora_B per module")
    return A, B


def _refuse_method(run: RunStages) -> None:
    if run.method == "lora":
        raise SafeclError(
            f"{run.dir}: a lora run (adapter.method: lora) cannot be composed: A trains in every stage together "
            "with B, so the adapter after a stage is B_t A_t with both factors changed and no stage's contribution "
            "is a separable part of it. compose works on lori-s runs (disjoint B entries over a frozen A) and "
            "lori-d runs (dense B stages over a frozen A).")
    if run.method not in METHODS:
        raise SafeclError(f"{run.dir}: adapter method {run.method!r}; compose works on lori-s and lori-d runs")


def _compose_sparse(run: RunStages, selected: list[StageEntry]) -> Composition:
    final_dir = run.entries[-1].adapter  # the adapter after the last stage (a rolled-back one restored it)
    final = load_adapter_tensors(final_dir)
    A, B = _split(final, final_dir)
    live = run.live
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for e in live:
        if not e.mask.is_file():
            raise SafeclError(f"{e.mask}: missing; a lori-s stage's part is given by its mask")
        m = load_mask(e.mask)
        if set(m) != set(B):
            odd = sorted(set(m) ^ set(B))[0]
            raise SafeclError(f"{e.mask}: module {odd} is in only one of the mask and the run's adapter")
        for name, t in m.items():
            if tuple(t.shape) != tuple(B[name].shape):
                raise SafeclError(f"{e.mask}: module {name}: mask {tuple(t.shape)} but B {tuple(B[name].shape)}")
        masks[e.name] = {n: t.to(torch.bool) for n, t in m.items()}
    claimed = {n: torch.zeros_like(b, dtype=torch.bool) for n, b in B.items()}
    for i, e in enumerate(live):
        for name, m in masks[e.name].items():
            if (m & claimed[name]).any():
                other = next(o.name for o in live[:i] if (masks[o.name][name] & m).any())
                raise SafeclError(
                    f"{run.dir}: the masks of stages {other!r} and {e.name!r} overlap (module {name}; "
                    "adapter.disjoint: false): the later stage overwrote entries of the earlier one, so their parts "
                    "cannot be separated")
            claimed[name] |= m
    for name, b in B.items():
        stray = ((b != 0) | torch.signbit(b)) & ~claimed[name]
        if stray.any():
            raise SafeclError(f"{final_dir}: module {name}: {int(stray.sum())} nonzero B entries lie outside every "
                              "stage's mask; the run's adapter is not the sum of its stages' parts")
    keep = {n: torch.zeros_like(b, dtype=torch.bool) for n, b in B.items()}
    for e in selected:
        for name, m in masks[e.name].items():
            keep[name] |= m
    out = {}
    for key, t in final.items():
        name = module_name(key)
        out[key] = t if key.endswith(".lora_A.weight") else torch.where(keep[name], t, torch.zeros_like(t))
        out[key] = out[key].contiguous()
    entries = {e.name: int(sum(int(m.sum()) for m in masks[e.name].values())) for e in selected}
    config = json.loads((final_dir / CONFIG).read_text(encoding="utf-8"))
    sources = [final_dir / CONFIG, final_dir / WEIGHTS, *(e.mask for e in live)]
    return Composition(run, selected, out, config, entries, sources,
                       "bit for bit: the run's final B on the selected stages' masks, 0 elsewhere",
                       masks=[masks[e.name] for e in selected])


def _compose_dense(run: RunStages, selected: list[StageEntry]) -> Composition:
    live = run.live
    adapters = [load_adapter_tensors(e.adapter) for e in live]
    ref_A, ref_B = _split(adapters[0], live[0].adapter)
    for e, t in zip(live[1:], adapters[1:]):
        A, B = _split(t, e.adapter)
        if set(A) != set(ref_A) or any(B[n].shape != ref_B[n].shape for n in B):
            raise SafeclError(f"{e.adapter}: other modules or shapes than {live[0].adapter}")
        changed = next((n for n in A if not bits_equal(A[n], ref_A[n])), None)
        if changed is not None:
            raise SafeclError(f"{e.adapter}: module {changed}: lora_A differs from stage {live[0].name!r}'s; a lori-d "
                              "run's A is one frozen projection, so this run's stages cannot be separated")
    pos = [live.index(e) for e in selected]
    config = json.loads((live[-1].adapter / CONFIG).read_text(encoding="utf-8"))
    sources = [p for e in live for p in (e.adapter / CONFIG, e.adapter / WEIGHTS)]
    parts = {}
    for e, i in zip(selected, pos):
        now = adapters[i]
        parts[e.name] = {k: now[k].double() - (adapters[i - 1][k].double() if i > 0 else 0.0)
                         for k in now if k.endswith(".lora_B.weight")}
    entries = {name: int(sum(int((p != 0).sum()) for p in part.values())) for name, part in parts.items()}
    if pos == list(range(len(pos))):  # the first k stages: the adapter saved after stage k
        src = adapters[pos[-1]]
        out = {k: v.contiguous() for k, v in src.items()}
        exact = f"bit for bit: the adapter saved after stage {selected[-1].name!r} (the first {len(pos)} stages)"
    else:
        out = {}
        for k, v in adapters[-1].items():
            if k.endswith(".lora_A.weight"):
                out[k] = v.contiguous()
            else:
                out[k] = sum(parts[e.name][k] for e in selected).to(v.dtype).contiguous()
        exact = ("sum of the selected stages' parts P_t = B_t - B_(t-1), accumulated in float64 and rounded once "
                 "to the adapter's dtype")
    return Composition(run, selected, out, config, entries, sources, exact)


def compose_tensors(run_dir: str | Path, names: list[str]) -> Composition:
    """The composed adapter of the named stages of the lori-s or lori-d run in ``run_dir``."""
    run = read_run(run_dir)
    _refuse_method(run)
    selected = select(run, names)
    if not selected:
        raise SafeclError(f"{run.dir}: no stage to compose (every stage was rolled back)")
    return (_compose_sparse if run.method == "lori-s" else _compose_dense)(run, selected)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance(c: Composition, fmt: str, outputs: dict[str, Path]) -> dict:
    run = c.run
    chosen = {e.name for e in c.selected}
    rel = lambda p: str(Path(p).relative_to(run.dir))  # noqa: E731
    return {
        "what": "safecl compose: a PEFT LoRA adapter holding exactly the named stages' parts of a run's adapter",
        "format": fmt,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "safecl_version": __version__,
        "run_dir": str(run.dir.resolve()),
        "run_status": run.status,
        "method": run.method,
        "base_model": c.config.get("base_model_name_or_path") or run.model,
        "stages": [{"name": e.name, "index": e.index, "dir": rel(e.dir), "repair_of": e.repair_of,
                    "b_entries": c.entries[e.name]} for e in c.selected],
        "left_out": [e.name for e in run.live if e.name not in chosen],
        "rolled_back": [e.name for e in run.entries if e.rolled_back],
        "exact": c.exact,
        "caveat": "the parameters are exactly those of the selected stages; stages trained after a left-out stage "
                  "were trained with it present, so measure the behaviour (safecl check), do not assume it",
        "sources_sha256": {rel(p): _sha256(p) for p in [run.dir / "run.json", run.dir / "recipe.resolved.yaml",
                                                        *c.sources] if p.is_file()},
        "output_sha256": {name: _sha256(p) for name, p in outputs.items()},
    }


def _check_out(out: Path, run: RunStages) -> None:
    o = out.resolve()
    if o == run.dir.resolve() or run.dir.resolve() / "stages" in o.parents or o == run.dir.resolve() / "stages":
        raise SafeclError(f"--out {out} is inside the run's stages/; choose a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PROVENANCE).is_file())):
        raise SafeclError(f"--out {out} exists and is not a compose output; choose a new directory")


def compose(run_dir: str | Path, names: list[str], out: str | Path, compact: bool = False) -> tuple[Path, dict]:
    """Write the composed adapter of ``names`` to ``out`` (a PEFT LoRA adapter directory, or with
    ``compact`` a directory holding the compact form) with ``provenance.json``; returns (out,
    provenance). The directory appears atomically (temp dir, rename)."""
    c = compose_tensors(run_dir, names)
    out = Path(out)
    _check_out(out, c.run)
    cfg = c.config
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    info = {"compose": {"run": str(c.run.dir), "stages": [e.name for e in c.selected], "method": c.run.method}}
    prov: dict = {}
    if not compact:
        def finish(tmp: Path) -> None:
            prov.update(provenance(c, "peft-lora", {WEIGHTS: tmp / WEIGHTS}))
            (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")

        write_peft_adapter(c.tensors, out, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=targets,
                           base_model=cfg.get("base_model_name_or_path"),
                           dropout=float(cfg.get("lora_dropout") or 0.0),
                           metadata={"safecl": json.dumps(info)}, finish=finish)
        return out, prov
    if c.masks is None:
        raise SafeclError(f"--compact: the compact form holds sparse B entries of lori-s runs; {c.run.dir} is a "
                          f"{c.run.method} run (dense B). Leave out --compact for a PEFT adapter")
    seed = c.run.recipe.get("adapter", {}).get("seed")
    seed = c.run.recipe.get("seed", 0) if seed is None else seed
    tensors, header = build_compact(c.tensors, c.masks, [e.name for e in c.selected], seed=int(seed),
                                    rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=targets,
                                    base_model=cfg.get("base_model_name_or_path"),
                                    dropout=float(cfg.get("lora_dropout") or 0.0))
    rebuilt = expand(tensors, header)
    if rebuilt.keys() != c.tensors.keys() or not all(bits_equal(rebuilt[k], c.tensors[k]) for k in rebuilt):
        raise SafeclError("the compact form does not rebuild the composed adapter bit for bit; not written")
    with atomic_directory(out) as tmp:
        write_compact(tensors, header, tmp / DEFAULT_NAME)
        prov.update(provenance(c, "safecl-lori-compact", {DEFAULT_NAME: tmp / DEFAULT_NAME}))
        (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
    return out, prov


# -- command line ----------------------------------------------------------------------------

COMPOSE_HELP = "Write any subset of a lori-s or lori-d run's stages as one PEFT LoRA adapter."
COMPOSE_EPILOG = f"""\
Each stage of a LoRI run owns its own part of B over one frozen A, so the run's adapter is the
sum of the stages' parts. compose keeps the named stages' parts and zeroes the rest:
  lori-s  B = the run's final B on the named stages' masks, 0 elsewhere (bit for bit; all
          stages = the run's adapter, the first k stages = the adapter saved after stage k)
  lori-d  B = sum of the named stages' parts B_t - B_(t-1) (a prefix of stages: bit for bit)
  lora    refused: A trains in every stage, so stages are not separable.
Repair passes are stages of their own (e.g. gsm8k.repair1); rolled-back stages hold no entries.
The output gets {PROVENANCE} (run, stages, method, sha256 of the files used, safecl version).

Caveat: leaving a stage out removes exactly its entries, but the stages after it were trained
with it present; measure the result with `safecl check`, do not assume it.

examples:
  safecl compose runs/quickstart --stages safety,arithmetic --out runs/compose/sa
  safecl compose runs/quickstart --stages safety,sentiment --out runs/compose/ss --compact
  safecl check builtin:smollm2-135m-instruct --adapter runs/compose/sa --recipe recipes/quickstart.yaml
"""


def configure_compose_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = p.description or COMPOSE_HELP
    p.epilog = p.epilog or COMPOSE_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("run_dir", metavar="RUN_DIR", help="a lori-s or lori-d run directory (a recipe's output_dir)")
    p.add_argument("--stages", required=True, metavar="NAME,NAME,...",
                   help="stage names to keep, comma-separated (repair passes by their names; 'all' = every stage "
                   "not rolled back)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created or replaced atomically)")
    p.add_argument("--compact", action="store_true",
                   help=f"write safecl's compact form (DIR/{DEFAULT_NAME}; lori-s only) instead of a PEFT adapter; "
                   f"`safecl compact DIR/{DEFAULT_NAME} --out ADAPTER` expands it")
    p.set_defaults(func=cmd_compose)
    return p


def cmd_compose(args) -> int:
    out, prov = compose(args.run_dir, parse_stages(args.stages), args.out, compact=args.compact)
    kept = sum(s["b_entries"] for s in prov["stages"])
    what = f"compact form {out / DEFAULT_NAME}" if args.compact else f"PEFT LoRA adapter {out}"
    print(f"[safecl] composed {', '.join(s['name'] for s in prov['stages'])} of {args.run_dir} ({prov['method']}; "
          f"{kept:,} B entries; left out: {', '.join(prov['left_out']) or 'none'}) -> {what}")
    print(f"[safecl] {prov['exact']}; provenance: {out / PROVENANCE}")
    if not args.compact:
        print(f"[safecl] measure it: safecl check {prov['base_model']} --adapter {out} --recipe RECIPE")
    if prov["run_status"] != "completed":
        print(f"[safecl] note: the run's status is {prov['run_status']!r}; composed from its finished stages")
    return 0
