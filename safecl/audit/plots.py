"""The audit's figures, one function per view, each taking a list of audits (one per run).

Every function returns a :class:`matplotlib.figure.Figure` drawn on the Agg canvas (no pyplot,
no global backend switch, so it works headless, in reports and in notebooks). With several
runs the views are overlaid (lines, one colour per run, named in the legend) or placed side
by side (one row of panels per run). Inputs are the dicts of
:func:`safecl.audit.summary.audit_run`; only the mask heatmap reads files (the stages'
``mask.safetensors``) to count entries per (layer, projection).

Views:

- ``safety``:    R[t, refusal] and R[t, over_refusal] per checkpoint, bootstrap CI as error
  bars, the recipe's ``gate.max_over_refusal`` as a dashed line.
- ``tasks``:     R[t, task:j] per checkpoint, one panel per task.
- ``retention``: safety retention R[t, refusal] / R[safety, refusal] from the safety stage on, with the audit's
  ``min_retention`` and the recipe's ``gate.min_retention`` as lines; refusal drop with
  ``gate.max_drop``.
- ``capacity``:  share of all B entries owned after each stage (``mask.capacity_used``),
  split into what earlier stages owned and what the stage added (``mask.density``).
- ``masks``:     entries of each stage's mask per (layer, projection).
- ``probe``:     probe retention (safecl.safety.probe) over the optimizer steps of all task
  stages, a dotted line at each stage start, ``gate.min_probe_retention`` dashed, the title
  marked "visual aid only" where the probe's kind is not measured to track the judge; only drawn
  when a run measured it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_LAYER = re.compile(r"\.(\d+)\.")
_PROJ_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    """(figure, 2-D array of axes) on an Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _color(i: int) -> str:
    return f"C{i % 10}"


def _checkpoints(audits: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["checkpoint"] for a in audits for r in a["matrix"]))


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, fontsize=9,
            color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _series(ax, audit: dict, column: str, xs: list[str], offset: float, color: str, label: str,
            linestyle: str = "-") -> bool:
    """Plot R[:, column] of one run with CI error bars; hollow markers on rolled-back rows."""
    points = [(xs.index(r["checkpoint"]) + offset, r["scores"][column], r["rolled_back"])
              for r in audit["matrix"] if r["scores"].get(column, {}).get("score") is not None]
    if not points:
        return False
    x = np.array([p[0] for p in points])
    y = np.array([p[1]["score"] for p in points])
    lo = np.array([y_ - (p[1]["ci"] or [y_, y_])[0] for p, y_ in zip(points, y)])
    hi = np.array([(p[1]["ci"] or [y_, y_])[1] - y_ for p, y_ in zip(points, y)])
    ax.errorbar(x, y, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], color=color, linestyle=linestyle,
                marker="o", capsize=3, label=label)
    rb = [i for i, p in enumerate(points) if p[2]]
    if rb:
        ax.scatter(x[rb], y[rb], s=90, facecolors="white", edgecolors=color, zorder=3,
                   label=f"{label}: rolled back")
    return True


def _axis(ax, xs: list[str], title: str, ylabel: str, ylim=(-0.05, 1.05)) -> None:
    ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right")
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)


def _threshold(ax, value, label: str, color: str = "black", linestyle: str = "--") -> None:
    if value is not None:
        ax.axhline(value, color=color, linestyle=linestyle, linewidth=1, label=label)


def _offsets(n: int, width: float = 0.08) -> list[float]:
    return [(i - (n - 1) / 2) * width for i in range(n)]


def _distinct(audits: list[dict], key) -> list:
    return list(dict.fromkeys(key(a) for a in audits if key(a) is not None))


def plot_safety(audits: list[dict]) -> Figure:
    """Refusal (higher is safer) and over-refusal (lower is better) across checkpoints."""
    fig, axes = new_figure(11, 3.8, 1, 2)
    xs = _checkpoints(audits)
    for ax, column, title in ((axes[0, 0], "refusal", "refusal of harmful prompts (higher = safer)"),
                              (axes[0, 1], "over_refusal", "over-refusal of benign prompts (lower = better)")):
        drawn = [_series(ax, a, column, xs, off, _color(i), a["name"])
                 for i, (a, off) in enumerate(zip(audits, _offsets(len(audits))))]
        if not any(drawn):
            _empty(ax, f"no {column} score recorded yet")
            continue
        if column == "over_refusal":
            for v in _distinct(audits, lambda a: a["gate"].get("max_over_refusal")):
                _threshold(ax, v, f"gate.max_over_refusal {v:g}")
        _axis(ax, xs, title, "share of prompts")
        ax.legend(fontsize=8, loc="best")
    return fig


def plot_tasks(audits: list[dict]) -> Figure:
    """Each task's score across checkpoints (from its own stage on), one panel per task."""
    tasks = list(dict.fromkeys(c for a in audits for c in a["columns"] if c.startswith("task:")))
    fig, axes = new_figure(max(5.5, 4.2 * max(1, len(tasks))), 3.8, 1, max(1, len(tasks)))
    if not tasks:
        _empty(axes[0, 0], "no task eval sets recorded yet")
        return fig
    xs = _checkpoints(audits)
    for ax, column in zip(axes[0], tasks):
        for i, (a, off) in enumerate(zip(audits, _offsets(len(audits)))):
            _series(ax, a, column, xs, off, _color(i), a["name"])
        _axis(ax, xs, f"{column} (higher = better)", "score")
        ax.legend(fontsize=8, loc="best")
    return fig


def plot_retention(audits: list[dict]) -> Figure:
    """Safety retention and refusal drop from the safety stage on (the rows the gate judges),
    against the audit's and the gate's thresholds."""
    fig, axes = new_figure(11, 3.8, 1, 2)
    xs = _checkpoints(audits)
    ax_r, ax_d = axes[0, 0], axes[0, 1]
    any_r = any_d = False
    for i, (a, off) in enumerate(zip(audits, _offsets(len(audits)))):
        s = a["summary"]
        rows = [r["checkpoint"] for r in a["matrix"]]
        gated = set(rows[rows.index(s["safety_stage"]):]) if s.get("safety_stage") in rows else set()
        for ax, values, flag in ((ax_r, s.get("safety_retention") or {}, "r"),
                                 (ax_d, s.get("refusal_drop") or {}, "d")):
            pts = [(xs.index(k) + off, v) for k, v in values.items() if v is not None and k in gated]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=_color(i), label=a["name"])
                rolled = {r["checkpoint"] for r in a["matrix"] if r["rolled_back"]}
                rb = [(xs.index(k) + off, v) for k, v in values.items() if v is not None and k in rolled]
                if rb:
                    ax.scatter(*zip(*rb), s=90, facecolors="white", edgecolors=_color(i), zorder=3,
                               label=f"{a['name']}: rolled back")
                any_r, any_d = any_r or flag == "r", any_d or flag == "d"
    if any_r:
        for v in _distinct(audits, lambda a: a["rule"]["min_retention"]):
            _threshold(ax_r, v, f"audit min_retention {v:g}", color="0.45", linestyle=":")
        for v in _distinct(audits, lambda a: a["gate"].get("min_retention")):
            _threshold(ax_r, v, f"gate.min_retention {v:g}")
        _axis(ax_r, xs, "safety retention = refusal / refusal after safety stage", "retention", ylim=None)
        ax_r.legend(fontsize=8, loc="best")
    else:
        _empty(ax_r, "safety retention undefined:\nrefusal after the safety stage is 0 or missing")
    if any_d:
        for v in _distinct(audits, lambda a: a["gate"].get("max_drop")):
            _threshold(ax_d, v, f"gate.max_drop {v:g}")
        _axis(ax_d, xs, "refusal drop = refusal after safety - refusal", "drop", ylim=None)
        ax_d.legend(fontsize=8, loc="best")
    else:
        _empty(ax_d, "refusal drop: no refusal score after the safety stage yet")
    return fig


def _no_masks(audit: dict) -> str:
    """Why a run shows no mask: its method has none, or no stage has written one yet."""
    method = audit.get("method")
    why = "none recorded yet" if method == "lori-s" else f"method {method} trains dense B"
    return f"{audit['name']} ({why})"


def plot_capacity(audits: list[dict]) -> Figure:
    """Mask capacity used after each stage: earlier stages' share plus this stage's density."""
    fig, axes = new_figure(8, 3.8)
    ax = axes[0, 0]
    stages = list(dict.fromkeys(st["name"] for a in audits for st in a["stages"]))
    masked = [i for i, a in enumerate(audits) if any(st.get("mask") for st in a["stages"])]
    missing = [_no_masks(a) for i, a in enumerate(audits) if i not in masked]
    width = 0.8 / max(1, len(masked))
    drawn = False
    for slot, i in enumerate(masked):
        a = audits[i]
        pts = [(stages.index(st["name"]), st["mask"], st["rolled_back"]) for st in a["stages"] if st.get("mask")]
        x = np.array([p[0] for p in pts]) + (slot - (len(masked) - 1) / 2) * width
        used = np.array([p[1]["capacity_used"] for p in pts])
        own = np.array([p[1]["density"] for p in pts])
        hatch = ["//" if p[2] else None for p in pts]  # a rolled-back stage's entries were released again
        ax.bar(x, used - own, width, color=_color(i), alpha=0.35, label=f"{a['name']}: owned by earlier stages")
        ax.bar(x, own, width, bottom=used - own, color=_color(i), hatch=hatch, edgecolor="white",
               label=f"{a['name']}: this stage")
        if any(hatch):
            ax.bar([], [], color="white", edgecolor="0.3", hatch="//", label="rolled back (entries released)")
        drawn = True
    if not drawn:
        _empty(ax, "no masks: " + ", ".join(missing))
        return fig
    ax.axhline(1.0, color="0.3", linewidth=1, linestyle="--", label="all B entries")
    ax.set_xticks(range(len(stages)), stages, rotation=20, ha="right")
    ax.set_ylabel("share of all B entries")
    ax.set_title("mask capacity used after each stage" + (f"  (no masks: {', '.join(missing)})" if missing else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    return fig


def mask_counts(path: str | Path) -> dict[tuple[str, str], int]:
    """{(layer index, projection): entries} of one mask file (see safecl.adapters.export.load_mask)."""
    from safecl.adapters.export import load_mask

    counts: dict[tuple[str, str], int] = {}
    for name, m in load_mask(path).items():
        hit = _LAYER.search(name)
        key = (hit.group(1) if hit else "-", name.rsplit(".", 1)[-1])
        counts[key] = counts.get(key, 0) + int(m.sum())
    return counts


def plot_masks(audits: list[dict]) -> Figure:
    """Heatmaps layers x projections of each stage's mask entries; one row per run."""
    rows = [(a, [st for st in a["stages"] if st.get("mask_file")]) for a in audits]
    with_masks = [(a, sts) for a, sts in rows if sts]
    if not with_masks:
        fig, axes = new_figure(8, 2.5)
        _empty(axes[0, 0], "no mask files: " + ", ".join(_no_masks(a) for a in audits))
        return fig
    counts = {(a["name"], st["name"]): mask_counts(st["mask_file"]) for a, sts in with_masks for st in sts}
    layers = sorted({k[0] for c in counts.values() for k in c}, key=lambda s: (len(s), s))
    projs = sorted({k[1] for c in counts.values() for k in c},
                   key=lambda p: (_PROJ_ORDER.index(p) if p in _PROJ_ORDER else 99, p))
    ncols = max(len(sts) for _, sts in with_masks)
    fig, axes = new_figure(max(6, 2.6 * ncols + 1.2), max(2.4, 0.22 * len(layers) + 1.6) * len(with_masks),
                           len(with_masks), ncols)
    vmax = max(max(c.values(), default=0) for c in counts.values()) or 1
    image = None
    for r, (a, sts) in enumerate(with_masks):
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(sts):
                ax.set_axis_off()
                continue
            st, grid = sts[c], counts[(a["name"], sts[c]["name"])]
            data = np.array([[grid.get((lay, p), 0) for p in projs] for lay in layers])
            image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            if data.size <= 120:
                for (y, x), v in np.ndenumerate(data):
                    ax.text(x, y, str(v), ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 * vmax else "black")
            ax.set_xticks(range(len(projs)), [p.replace("_proj", "") for p in projs], fontsize=7)
            ax.set_yticks(range(len(layers)), layers, fontsize=7)
            rolled = " (rolled back)" if st.get("rolled_back") else ""
            ax.set_title(f"{a['name']}: {st['index']:02d} {st['name']}{rolled}", fontsize=9)
            if c == 0:
                ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes, shrink=0.8, label="mask entries")
    without = [_no_masks(a) for a, sts in rows if not sts]
    if without:
        fig.suptitle("no mask files: " + ", ".join(without), fontsize=9, color="0.35")
    return fig


def plot_probe(audits: list[dict]) -> Figure:
    """Probe retention against the global optimizer step, one line per run."""
    fig, axes = new_figure(11, 3.6)
    ax = axes[0, 0]
    for i, a in enumerate(audits):
        pts = [(p["global_step"], p["probe_retention"]) for p in a.get("probe") or [] if p["probe_retention"] is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts), marker=".", color=_color(i), label=a["name"])
        starts = {}
        for p in a["probe"]:
            starts.setdefault(p["stage"], p["global_step"])
        for stage, x in starts.items():
            ax.axvline(x, color=_color(i), linestyle=":", linewidth=0.8)
            ax.text(x, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), fontsize=8, va="top", color=_color(i))
        for st in a["stages"]:
            w = st.get("watch")
            if w:
                ax.scatter([starts.get(st["name"], 0) + w["step"]], [w["probe_retention"]], s=90, facecolors="white",
                           edgecolors=_color(i), zorder=3, label=f"{a['name']}: watch {w['action']} ({st['name']})")
    for v in _distinct(audits, lambda a: a["gate"].get("min_probe_retention")):
        _threshold(ax, v, f"gate.min_probe_retention {v:g}")
    ax.axhline(1.0, color="0.6", linewidth=0.8)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("optimizer step (task stages, in order)")
    ax.set_ylabel("probe retention")
    aid = sorted({f"{(st.get('probe') or {}).get('kind')}" for a in audits for st in a["stages"]
                  if (st.get("probe") or {}).get("role") == "visual aid"})
    title = "refusal probe: 0 = base model, 1 = after the safety stage"
    if aid:  # the kind is not measured to track the judged check (safecl.safety.config.MEASURED_SPEARMAN)
        title += f"\nVISUAL AID ONLY ({', '.join(aid)} probe: not measured to track the judged check)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return fig


FIGURES = [
    ("safety", "Refusal and over-refusal across stages", plot_safety),
    ("tasks", "Task scores across stages", plot_tasks),
    ("retention", "Safety retention and refusal drop against the thresholds", plot_retention),
    ("capacity", "Mask capacity used per stage", plot_capacity),
    ("masks", "Where the masks sit (entries per layer and projection)", plot_masks),
]


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def make_figures(audits: list[dict]) -> list[tuple[str, str, Figure]]:
    """[(key, title, figure)] for every view in :data:`FIGURES` (+ ``probe`` when a run has its curve)."""
    views = [(key, title, fn(audits)) for key, title, fn in FIGURES]
    if any(a.get("probe") for a in audits):
        views.append(("probe", "Refusal probe during training", plot_probe(audits)))
    return views
