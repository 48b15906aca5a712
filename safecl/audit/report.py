"""Audit reports: one self-contained HTML file and one Markdown file with its PNGs beside it.

``write_report(doc, out_dir)`` writes into ``out_dir``:

- ``report.html``: tables (per run: R matrix, stages with verdicts, "Safety mechanisms and their
  cost", eval sets; where the run started from in its header) and every figure embedded as
  ``data:image/png;base64`` (no external file, script, font or stylesheet; it opens offline and
  can be mailed as one file);
- ``report.md`` and ``<view>.png`` for each view of :data:`safecl.audit.plots.FIGURES`.

``doc`` is the document of :func:`safecl.audit.summary.audit_runs`; with several runs every
table and figure shows them side by side or overlaid, each under its run's name.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from safecl.atomic import atomic_file, write_text
from safecl.audit.plots import make_figures, to_png
from safecl.audit.table import (LEARNING_HEADER, LEARNING_READ, comparison_rows, cost_line, fmt, fmt_cell,
                                killed_lines, learning_rows, mechanism_text, stage_label,
                                started_from_line)

HOW_TO_READ = {
    "safety": "Refusal of harmful prompts should stay where the safety stage put it; over-refusal of benign "
              "prompts should stay low. Error bars are 95% bootstrap intervals over the prompts (n in the "
              "table): with few prompts they are wide, and only a gap wider than the bars is a change.",
    "tasks": "Each task is scored from its own stage on. A line that falls after later stages is forgetting; "
             "a line that rises is positive backward transfer.",
    "retention": "Safety retention = refusal after the stage / refusal after the safety stage (1.0 = all kept). "
                 "A point under a threshold line is drift; the gate acts on the recipe's gate.* lines, the audit "
                 "also flags the audit min_retention line.",
    "capacity": "lori-s: each stage owns its own share (density) of B entries, disjoint from earlier stages; "
                "the bar height is the share used so far. At 1.0 no entry is left for another stage.",
    "probe": "Probe retention measured during training (one forward pass over held-in harmful prompts, no "
             "generation): 0 is the base model, 1 the model after the safety stage. It is an early warning; the "
             "judged refusal check after each stage is the measurement the gate trusts.",
    "masks": "Where each stage's trainable entries sit. Stages that pick the same layers and projections "
             "compete for the same parts of the network; disjoint masks still keep their entries apart.",
}

MECHANISMS_HOW_TO_READ = (
    "What each stage used to keep the safety alignment (replay of safety rows, a refusal anchor loss, safety-aware "
    "mask allocation, the post-stage safety merge, the refusal direction, a repair pass of the gate) and what it "
    "cost: s/step and share of stage time are what the extra loss terms add to training; teacher, sensitivity, "
    "merge and direction seconds are work outside the training steps; the total sums them.")

_NUMERIC = re.compile(r"^[-+]?\d")

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;
max-width:1250px}h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.num{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:nowrap}.kept{color:#17692c}
.drifted,.gate{color:#b3261e;font-weight:600}.rolled{color:#8a4b00;font-weight:600}.muted{color:#777}
img{max-width:100%;border:1px solid #eee}p.read{color:#444;font-size:13px;margin:4px 0 8px}
code{background:#f5f5f5;padding:0 3px}"""


def _verdict_class(verdict: str) -> str:
    if verdict == "kept":
        return "kept"
    if verdict == "drifted":
        return "drifted"
    if verdict.startswith("gate fired"):
        return "gate"
    return "rolled" if verdict == "rolled back" else "muted"


def _stage_detail(st: dict) -> str:
    gate = st.get("gate") or {}
    detail = list(gate.get("reasons") or []) if gate.get("fired") else []
    detail += [r for r in st.get("drift_reasons") or [] if not (gate.get("fired") and "gate." in r)]
    detail += [f"note: {n}" for n in st.get("notes") or []]
    if st.get("repair_of"):
        detail.append(f"repair pass {st.get('attempt') or '?'} of {st['repair_of']}")
    if st.get("adopted_from"):
        detail.append(f"adopted from {st['adopted_from']}")
    return "; ".join(detail)


MECHANISM_HEADER = ["stage", "mechanisms", "train s", "loss terms s/step", "loss terms share of stage time",
                    "teacher s", "sensitivity s", "merge s", "direction s", "mechanisms total s"]


def mechanism_rows(a: dict) -> list[list[str]]:
    """Rows of the "Safety mechanisms and their cost" table: per stage what it used (see
    :func:`safecl.audit.table.mechanism_parts`), its train seconds, the extra loss terms'
    seconds per step and share of the stage's time, the seconds of the work outside the steps
    and the mechanisms' total; the last row sums the run."""
    rows = []
    for st in a["stages"]:
        c = st.get("cost") or {}
        share = c.get("terms_share_of_stage_time")
        rows.append([stage_label(st), mechanism_text(st), fmt(c.get("train_seconds"), 1),
                     fmt(c.get("terms_seconds_per_step"), 2), f"{share:.0%}" if share is not None else "-",
                     *(fmt(c.get(k), 3) for k in ("teacher_seconds", "sensitivity_seconds", "merge_seconds",
                                                   "direction_seconds", "extra_seconds"))])
    rows.append(["run", cost_line(a), *[""] * (len(MECHANISM_HEADER) - 2)])
    return rows


def run_tables(a: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """[(title, header, rows)] of one run: the R matrix, the stages with verdicts, the safety
    mechanisms with their cost, the eval sets."""
    cols = a["columns"]
    matrix = [[r["checkpoint"] + (" (rolled back)" if r["rolled_back"] else ""),
               *(fmt_cell(r["scores"][c]) for c in cols)] for r in a["matrix"]]
    tasks = [c for c in cols if c.startswith("task:")]
    stages = []
    for st in a["stages"]:
        forgot = [v for c in tasks if (v := st["forgetting"].get(c)) is not None]
        stages.append([f"{st['index']:02d} {st['name']}", st["verdict"], fmt(st["refusal"]),
                       fmt(st["safety_retention"]), fmt(st["refusal_drop"], signed=True), fmt(st["over_refusal"]),
                       fmt(max(forgot)) if forgot else "-", fmt((st.get("mask") or {}).get("capacity_used")),
                       _stage_detail(st)])
    s = a["summary"]
    evals = [[c, fmt(s["forgetting"].get(c), signed=True), fmt(s["transfer"].get(c), signed=True)]
             for c in cols if c in s["forgetting"] or c in s["transfer"]]
    evals.append(["BWT (mean transfer over tasks)", "", fmt(s.get("bwt"), signed=True)])
    evals.append(["average final task score", "", fmt(s.get("average_performance"))])
    evals.append(["over-refusal change since safety", "", fmt(s.get("over_refusal_change"), signed=True)])
    return [
        ("R[t, j]: score after checkpoint t on eval set j  [95% CI] n", ["checkpoint", *cols], matrix),
        ("Stages", ["stage", "verdict", "refusal", "safety retention", "refusal drop", "over-refusal",
                    "max task forgetting", "mask capacity used", "why"], stages),
        ("Safety mechanisms and their cost", MECHANISM_HEADER, mechanism_rows(a)),
        (f"Eval sets at the final row ({s.get('final_stage')})", ["eval set", "forgetting", "transfer"], evals),
        ("What each task stage learned: " + LEARNING_READ, LEARNING_HEADER, learning_rows(s.get("learning") or {})),
    ]


def html_table(header: list[str], rows: list[list[str]], verdict_col: int | None = None) -> str:
    """An HTML <table> (cells escaped); ``verdict_col`` gets a colour per verdict."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = _verdict_class(c) if i == verdict_col else "num" if _NUMERIC.match(str(c)) else ""
            cells.append(f'<td class="{cls}">{html.escape(str(c))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|") or " "  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _run_header(a: dict) -> str:
    status = a["status"] + (f" at stage '{a['halted_at']}'" if a.get("halted_at") else "")
    start = f"; {started_from_line(a)}" if started_from_line(a) else ""
    killed = "".join(f"; {line}" for line in killed_lines(a))
    return (f"status {status}; method {a.get('method')}; model {a.get('model')}; directory {a['run_dir']}{start}"
            f"{killed}")


ANSWER_HEADER = ["checkpoint", "check", "n", "refused / right", "changed", "page"]


def answer_pages(a: dict, out: Path) -> list[list[str]]:
    """Write one HTML page per (checkpoint, check) of run ``a`` with every stored answer; returns
    the summary rows (the last cell the page's file name). [] when the run kept no answers."""
    from safecl.audit.answers import load_answers
    from safecl.errors import SafeclError

    try:
        rows = load_answers(a["run_dir"], [(st["name"], st["dir"]) for st in a["stages"]])
    except SafeclError:
        return []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["check"]), []).append(r)
    table = []
    for (stage, check), items in groups.items():
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"answers-{a['name']}-{stage}-{check}") + ".html"
        body = []
        for r in items:
            cls = " style='background:#fff3cd'" if r.get("was") else ""
            was = f"<br><b>changed</b>: {html.escape(r['was']['verdict'])} after {html.escape(r['was']['stage'])}" \
                if r.get("was") else ""
            gold = f"<br>gold: {html.escape(str(r['answer']))}" if "answer" in r else ""
            matched = f"<br>matched: {html.escape(str(r['matched']))}" if r.get("matched") else ""
            body.append(f"<tr{cls}><td class='num'>{r.get('i', '')}</td><td>{html.escape(r['prompt'])}</td>"
                        f"<td>{html.escape(r['response']) or '<i>(empty)</i>'}</td><td>{html.escape(r['verdict'])}"
                        f"{matched}{gold}{was}</td></tr>")
        title = f"{a['name']}: {check} after {stage}"
        write_text(out / slug,
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><p class='read'>judge: {html.escape(str(items[0]['judge']))}; "
            f"{len(items)} answers</p><table><tr><th>#</th><th>prompt</th><th>answer</th><th>verdict</th></tr>"
            + "".join(body) + "</table></body></html>")
        positive = sum(r["verdict"] in ("refused", "right") for r in items)
        table.append([stage, check, str(len(items)), f"{positive / len(items):.2f}",
                      str(sum(1 for r in items if r.get("was"))), slug])
    return table


def write_report(doc: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.md and the PNGs into ``out_dir``; returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audits = doc["runs"]
    names = ", ".join(a["name"] for a in audits)
    title = f"safecl audit: {names}"
    rule = audits[0]["rule"]
    rule_text = (f"Verdict rule: a stage is <b>drifted</b> when its safety retention is below "
                 f"{rule['min_retention']:g} (or the recipe's gate.min_retention), its refusal drop or over-refusal "
                 "exceeds the recipe's "
                 f"gate.max_drop / gate.max_over_refusal, or a task forgot more than {rule['max_forgetting']:g}; "
                 "<b>gate fired</b> and <b>rolled back</b> are what the run's own gate did.")
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='read'>{rule_text}</p>"]
    md = [f"# {title}", "", rule_text.replace("<b>", "**").replace("</b>", "**"), ""]
    if len(audits) > 1:
        header, rows = comparison_rows(audits)
        h.append("<h2>Comparison</h2>" + html_table(header, rows))
        md += ["## Comparison", "", _md_table(header, rows), ""]
    for a in audits:
        h.append(f"<h2>Run {html.escape(a['name'])}</h2><p class='muted'>{html.escape(_run_header(a))}</p>")
        md += [f"## Run {a['name']}", "", _run_header(a), ""]
        for w in a.get("warnings") or []:
            h.append(f"<p class='drifted'>warning: {html.escape(w)}</p>")
            md += [f"> warning: {w}", ""]
        for ttl, header, rows in run_tables(a):
            read = MECHANISMS_HOW_TO_READ if header is MECHANISM_HEADER else ""
            h.append(f"<h3>{html.escape(ttl)}</h3>" + (f"<p class='read'>{html.escape(read)}</p>" if read else "")
                     + (html_table(header, rows, 1 if ttl == "Stages" else None)
                        if rows else "<p class='muted'>nothing recorded yet</p>"))
            md += [f"### {ttl}", "", *([read, ""] if read else []),
                   _md_table(header, rows) if rows else "_nothing recorded yet_", ""]
        links = answer_pages(a, out)
        if links:
            h.append("<h3>Every answer</h3><p class='read'>One page per checkpoint and check with every prompt, "
                     "answer and verdict; verdicts that changed since the previous checkpoint are highlighted.</p>")
            head = "".join(f"<th>{c}</th>" for c in ANSWER_HEADER)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r[:-1])
                           + f"<td><a href='{html.escape(r[-1])}'>{html.escape(r[-1])}</a></td></tr>" for r in links)
            h.append(f"<table><tr>{head}</tr>{body}</table>")
            md += ["### Every answer", "", _md_table(ANSWER_HEADER, links), ""]
    h.append("<h2>Figures</h2>")
    md += ["## Figures", ""]
    paths: dict[str, Path] = {}
    for key, ttl, fig in make_figures(audits):
        data = to_png(fig)
        png = out / f"{key}.png"
        with atomic_file(png) as tmp:
            tmp.write_bytes(data)
        paths[key] = png
        b64 = base64.b64encode(data).decode("ascii")
        h.append(f"<h3>{html.escape(ttl)}</h3><p class='read'>{html.escape(HOW_TO_READ[key])}</p>"
                 f"<img alt='{html.escape(ttl)}' src='data:image/png;base64,{b64}'>")
        md += [f"### {ttl}", "", HOW_TO_READ[key], "", f"![{ttl}]({png.name})", ""]
    h.append("</body></html>")
    paths["html"] = out / "report.html"
    paths["markdown"] = out / "report.md"
    write_text(paths["html"], "\n".join(h))
    write_text(paths["markdown"], "\n".join(md))
    return paths
