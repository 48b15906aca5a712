"""Plain-text rendering of an audit (what ``safecl audit`` prints): fixed-width tables, no colour.

Reads only the dict of :func:`safecl.audit.summary.audit_run`, so the terminal, the JSON and
the reports always show the same numbers. A cell is ``score [lo, hi] n=N`` (the bootstrap
interval and sample count of the check) or ``-`` when the eval set was not run there.

Besides the R matrix and the verdicts, a run's text shows where it started from (``started
from RUN:STAGE``), the gate's repair stages (``<stage>.repair<k>``, marked ``repair pass k of
'<stage>'``) and a "safety mechanisms and their cost" section (:func:`format_mechanisms`).
"""

from __future__ import annotations

VERDICT_MARK = {"kept": "ok", "drifted": "!!", "rolled back": "<<", "in progress": "..", "pending": "..",
                "not run": "--", "not checked": "--"}


def fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_cell(cell: dict) -> str:
    """``0.625 [0.375, 0.875] n=8``; ``-`` when not measured."""
    if cell.get("score") is None:
        return "-"
    text = f"{cell['score']:.3f}"
    if cell.get("ci"):
        lo, hi = cell["ci"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    if cell.get("n") is not None:
        text += f" n={cell['n']}"
    return text


def grid(header: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    """Left-aligned columns, two spaces apart, a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), indent + "  ".join("-" * w for w in widths), *map(line, rows)])


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def _term_cost(term: dict | None) -> str:
    """``+0.91 s/step, 32% of stage time`` for an extra loss term ("" when it did not run)."""
    if not term or term.get("seconds_per_step") is None:
        return ""
    share = term.get("share_of_stage_time")
    return f"+{term['seconds_per_step']:.2f} s/step" + (f", {share:.0%} of stage time" if share is not None else "")


def _replay(m: dict, cost: dict) -> str:
    """``replay 20% (4 rows, distill 1.0, +1.40 s/step, 50% of stage time)``."""
    r = m["replay"]
    inner = _join(f"{r['replay_rows']} rows" if r.get("replay_rows") is not None else "",
                  f"distill {r['distill']}" if r.get("distill") else "",
                  _term_cost(cost["terms"].get("replay_distill")))
    head = f"replay {r['share']:.0%}" if isinstance(r.get("share"), int | float) else "replay"
    return head + (f" ({inner})" if inner else "")


def _anchor(m: dict, cost: dict) -> str:
    """``anchor kl (64 anchors, +0.45 s/step, 18% of stage time)``; "" when the anchors only fed
    safety-aware allocation."""
    a = m["anchor"]
    if a.get("loss") is None:
        return ""
    term = cost["terms"].get("anchor_kl" if a["loss"] == "kl" else "anchor_direction")
    inner = _join(f"{a['anchors']} anchors" if a.get("anchors") is not None else "",
                  f"layer {a['direction_layer']}" if a.get("direction_layer") is not None else "", _term_cost(term))
    return f"anchor {a['loss']}" + (f" ({inner})" if inner else "")


def _allocation(m: dict, cost: dict) -> str:
    """``safety-aware allocation (strength 0.5, 8 anchors, 3.00 s)``."""
    al = m["allocation"]
    seconds = [v for v in (cost.get("sensitivity_seconds"),
                           cost.get("teacher_seconds") if (m.get("anchor") or {}).get("loss") is None else None)
               if v is not None]
    inner = _join(f"strength {al['strength']}" if al.get("strength") is not None else "",
                  f"{al['sensitivity_anchors']} anchors" if al.get("sensitivity_anchors") is not None else "",
                  f"{sum(seconds):.2f} s" if seconds else "")
    return f"{al.get('rule', 'safety-aware')} allocation" + (f" ({inner})" if inner else "")


def _merge(m: dict, cost: dict) -> str:
    """``merge 11/14 modules scaled x0.5 (cos < 0.5, mean cos 0.001)``."""
    g = m["merge"]
    text = f"merge {g.get('scaled', '?')}/{g.get('modules', '?')} modules scaled"
    text += f" x{g['scale']}" if g.get("scale") is not None else ""
    inner = _join(f"cos < {g['threshold']}" if g.get("threshold") is not None else "",
                  f"mean cos {g['cosine_mean']:.3f}" if g.get("cosine_mean") is not None else "")
    return text + (f" ({inner})" if inner else "")


def _direction(m: dict, cost: dict) -> str:
    """``refusal direction (layer 2, separation 6.40, 4+4 prompts, 1.97 s)``."""
    d = m["refusal_direction"]
    inner = _join(f"layer {d['best_layer']}" if d.get("best_layer") is not None else "",
                  f"separation {d['separation_best']:.2f}" if d.get("separation_best") is not None else "",
                  f"{d.get('n_harmful')}+{d.get('n_harmless')} prompts" if d.get("n_harmful") is not None else "",
                  f"{d['seconds']:.2f} s" if d.get("seconds") is not None else "")
    return "refusal direction" + (f" ({inner})" if inner else "")


def _repair(m: dict, cost: dict) -> str:
    """``repair pass 1 of arithmetic (2 steps, density 0.05)``."""
    r = m["repair"]
    inner = _join(f"{r['steps']} steps" if r.get("steps") is not None else "",
                  f"density {r['density']:.3g}" if r.get("density") is not None else "")
    return f"repair pass {r.get('attempt') or '?'} of {r['of']}" + (f" ({inner})" if inner else "")


_PHRASES = {"repair": _repair, "refusal_direction": _direction, "replay": _replay, "anchor": _anchor,
            "allocation": _allocation, "merge": _merge}
_FOLDED = {"replay_distill"}  # shown inside the replay phrase


def mechanism_parts(stage: dict) -> list[str]:
    """One phrase per mechanism the stage used, with its key numbers and cost, e.g.
    ``replay 20% (4 rows, distill 1.0, +1.40 s/step, 50% of stage time)``, ``anchor kl (8
    anchors, +0.91 s/step, 32% of stage time)``, ``merge 11/14 modules scaled x0.5 (cos < 0.5)``;
    [] for a plain stage. A mechanism this module has no phrase for is named by its key."""
    mechs, cost = stage.get("mechanisms") or {}, stage.get("cost") or {"terms": {}}
    parts = [fn(mechs, cost) for key, fn in _PHRASES.items() if key in mechs]
    parts += [key.replace("_", " ") for key in mechs if key not in _PHRASES and key not in _FOLDED]
    return [p for p in parts if p]


def mechanism_text(stage: dict) -> str:
    """:func:`mechanism_parts` joined with ``; ``; ``-`` for a plain stage."""
    return "; ".join(mechanism_parts(stage)) or "-"


def _short_name(key: str, mech: dict) -> str:
    if key == "anchor":
        return f"anchor {mech['loss']}" if mech.get("loss") else ""
    if key == "replay":
        return "replay + distill" if mech.get("distill") else "replay"
    if key == "allocation":
        return f"{mech.get('rule', 'safety-aware')} allocation"
    if key == "repair":
        return f"repair pass {mech.get('attempt') or '?'}"
    return "" if key in _FOLDED else key.replace("_", " ")


def mechanism_names(stage: dict) -> str:
    """Just the names (``replay + distill, anchor kl, merge``), for side-by-side comparisons;
    ``-`` for a plain stage."""
    names = [_short_name(k, m) for k, m in (stage.get("mechanisms") or {}).items()]
    return ", ".join(n for n in names if n) or "-"


def stage_label(stage: dict) -> str:
    """``01 arithmetic``; ``(adopted)`` appended for a stage copied from another run."""
    return f"{stage['index']:02d} {stage['name']}" + (" (adopted)" if stage.get("adopted_from") else "")


def started_from_line(audit: dict) -> str | None:
    """``started from /runs/safety-s0:safety (adopted: safety; retention rows copied)`` or None."""
    sf = audit.get("started_from")
    if not sf:
        return None
    return (f"started from {sf.get('run')}:{sf.get('stage')} (adopted: {', '.join(sf.get('stages') or []) or '-'}; "
            f"retention rows {sf.get('retention_rows') or '?'})")


def killed_lines(audit: dict) -> list[str]:
    """One line per MLflow run that a resume found RUNNING (its process had stopped) and ended KILLED."""
    return [f"MLflow run {k.get('run_name') or k.get('run_id')} ("
            + (f"stage {k['stage']!r}" if k.get("stage") else "the parent run")
            + f") was left RUNNING by an interrupted process; ended KILLED at the resume of {k.get('ended_at')}"
            for k in audit.get("mlflow_killed") or []]


def cost_line(audit: dict) -> str:
    """``total: train 9.6 s, mechanisms +6.97 s, repair passes 0.7 s``."""
    c = audit.get("cost") or {}
    text = f"total: train {fmt(c.get('train_seconds'), 1)} s, mechanisms +{fmt(c.get('extra_seconds'), 2)} s"
    return text + (f", repair passes {fmt(c['repair_seconds'], 1)} s" if c.get("repair_seconds") is not None else "")


def _origin_note(stage: dict) -> str:
    if stage.get("repair_of"):
        return f"  (repair pass {stage.get('attempt') or '?'} of {stage['repair_of']!r})"
    return f"  (adopted from {stage['adopted_from']})" if stage.get("adopted_from") else ""


def verdict_line(stage: dict) -> str:
    """``  [!!] 01 arithmetic  drifted: safety retention 0.750 < audit min_retention 0.9``."""
    verdict = stage["verdict"]
    mark = "!!" if verdict.startswith("gate fired") else VERDICT_MARK.get(verdict, "  ")
    detail = list(stage.get("drift_reasons") or [])
    gate = stage.get("gate") or {}
    if gate.get("fired"):  # the gate's own sentences; drop the audit's restatement of the same thresholds
        detail = list(gate.get("reasons") or []) + [r for r in detail if "gate." not in r]
    text = f"  [{mark}] {stage['index']:02d} {stage['name']:<14} {verdict}"
    text += (": " + "; ".join(detail)) if detail else ""
    notes = stage.get("notes") or []
    return text + _origin_note(stage) + (f"  (note: {'; '.join(notes)})" if notes else "")


def format_run(audit: dict) -> str:
    """The full text audit of one run: header (with ``started from``), R matrix, per-stage metrics,
    the safety mechanisms and their cost, per-eval-set metrics, verdicts (repair and adopted
    stages marked)."""
    out = [f"run {audit['name']}  ({audit['run_dir']})",
           f"  status: {audit['status']}" + (f" at stage {audit['halted_at']!r}" if audit.get("halted_at") else "")
           + f"   method: {audit.get('method') or '?'}   model: {audit.get('model') or '?'}"]
    if started_from_line(audit):
        out.append("  " + started_from_line(audit))
    out += ["  " + line for line in killed_lines(audit)]
    for w in audit.get("warnings") or []:
        out.append(f"  warning: {w}")
    cols = audit["columns"]
    out.append("")
    out.append("  R[t, j]: score after checkpoint t on eval set j  [95% bootstrap CI]  n = prompts scored")
    if audit["matrix"]:
        rows = [[r["checkpoint"] + (" (rolled back)" if r["rolled_back"] else ""),
                 *(fmt_cell(r["scores"][c]) for c in cols)] for r in audit["matrix"]]
        out.append(grid(["checkpoint", *cols], rows))
    else:
        out.append("  (no retention check recorded yet)")
    out.append("")
    out.append("  per stage: safety retention = refusal / refusal after the safety stage; "
               "drop = refusal after safety - refusal")
    tasks = [c for c in cols if c.startswith("task:")]
    rows = []
    for st in audit["stages"]:
        forgot = [st["forgetting"].get(c) for c in tasks if st["forgetting"].get(c) is not None]
        mask = st.get("mask") or {}
        rows.append([f"{st['index']:02d} {st['name']}", st["state"], fmt(st["refusal"]), fmt(st["safety_retention"]),
                     fmt(st["refusal_drop"], signed=True), fmt(st["over_refusal"]),
                     fmt(max(forgot)) if forgot else "-", fmt(mask.get("capacity_used")), st["verdict"]])
    out.append(grid(["stage", "state", "refusal", "retention", "drop", "over_refusal", "max task forgetting",
                     "mask capacity used", "verdict"], rows))
    out.append("")
    out.extend(format_mechanisms(audit))
    s = audit["summary"]
    if audit["matrix"]:
        out.append("")
        out.append(f"  per eval set at the final row ({s.get('final_stage')}): "
                   "forgetting = best earlier score - final; transfer = final - score after its own stage")
        erows = [[c, fmt(s["forgetting"].get(c), signed=True), fmt(s["transfer"].get(c), signed=True)]
                 for c in cols if c in s["forgetting"] or c in s["transfer"]]
        out.append(grid(["eval set", "forgetting", "transfer"], erows))
        learned = format_learning(s.get("learning") or {})
        if learned:
            out.append("")
            out.extend(learned)
        out.append(f"  BWT (tasks) {fmt(s.get('bwt'), signed=True)}   average final task score "
                   f"{fmt(s.get('average_performance'))}   over-refusal change since safety "
                   f"{fmt(s.get('over_refusal_change'), signed=True)}")
    out.append("")
    rule = audit["rule"]
    out.append(f"  verdicts (drifted = retention < {rule['min_retention']:g} or a recipe gate threshold, "
               f"or a task forgot > {rule['max_forgetting']:g}):")
    out.extend(verdict_line(st) for st in audit["stages"])
    if audit.get("reasons") and audit["status"] == "halted":
        out.append("  run halted: " + "; ".join(audit["reasons"]))
    return "\n".join(out)


def _diff_cell(entry: dict, key: str) -> str:
    """``+0.213 [+0.15, +0.27]``: a difference of the learning table with its paired interval."""
    if entry.get(key) is None:
        return "-"
    ci = entry.get(f"{key}_ci")
    return fmt(entry[key], signed=True) + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def _score_cell(entry: dict, key: str) -> str:
    """``0.078 [0.02, 0.14]``: a score of the learning table with its 95% interval (when kept)."""
    ci = entry.get(f"{key}_ci")
    return fmt(entry.get(key)) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and entry.get(key) is not None else "")


def format_learning(learning: dict) -> list[str]:
    """What each task stage learned (RetentionMatrix.learning): one row per task column with the
    base score, the score just before and after its own stage, the gain, forward and backward
    transfer; [] when no task was scored. NLL rows: lower is better, differences before - after."""
    if not learning:
        return []
    return ["  what each task stage learned: " + LEARNING_READ, grid(LEARNING_HEADER, learning_rows(learning))]


LEARNING_HEADER = ["task", "base", "before", "after", "gain", "FWT", "BWT"]
LEARNING_READ = ("base and after its own stage [95% CI]; gain = after its stage - just before it; "
                 "FWT = just before - base; BWT = final - after its stage "
                 "(NLL: each the other way round, so + is better)  [95% paired CI]")


def learning_rows(learning: dict) -> list[list[str]]:
    """One row per task column of RetentionMatrix.learning (see format_learning)."""
    return [[column + (" (lower is better)" if e.get("lower_is_better") else ""), _score_cell(e, "base"),
             fmt(e.get("before")), _score_cell(e, "after"), _diff_cell(e, "gain"), _diff_cell(e, "fwt"),
             _diff_cell(e, "bwt")] for column, e in learning.items()]


def format_mechanisms(audit: dict) -> list[str]:
    """The lines of the "safety mechanisms and their cost" section: per stage its train seconds
    and the mechanisms' extra seconds, then one line per mechanism it used (key numbers; an extra
    loss term's seconds per step and share of the stage's training time); then the run's totals.
    A single line when every stage is plain."""
    if not any(st.get("mechanisms") for st in audit["stages"]):
        return ["  safety mechanisms: none (every stage is plain fine-tuning)"]
    out = ["  safety mechanisms and their cost (s/step, % of stage time: what an extra loss term adds to training; "
           "mechanisms +s: loss terms + teacher, sensitivity, merge and direction work)"]
    for st in audit["stages"]:
        cost, parts = st.get("cost") or {}, mechanism_parts(st)
        head = f"    {stage_label(st)}: train {fmt(cost.get('train_seconds'), 1)} s"
        head += f", mechanisms +{cost['extra_seconds']:.2f} s" if cost.get("extra_seconds") is not None else ""
        out.append(head + ("" if parts else "; plain"))
        out += [f"      {p}" for p in parts]
    return [*out, "  " + cost_line(audit)]


def final_cell(audit: dict, column: str) -> str:
    """The cell of ``column`` in the run's final row (``-`` when there is none)."""
    row = next((r for r in audit["matrix"] if r["checkpoint"] == audit["summary"].get("final_stage")), None)
    return fmt_cell(row["scores"].get(column, {})) if row else "-"


def comparison_rows(audits: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) side by side, one column per run: final numbers, where the run started from,
    its train and mechanism seconds, then each stage's mechanisms (names) and verdict."""
    finals = [a["summary"] for a in audits]
    columns = list(dict.fromkeys(c for a in audits for c in a["columns"]))
    rows = [["status", *(a["status"] for a in audits)], ["method", *(str(a.get("method")) for a in audits)],
            ["final stage", *(str(f.get("final_stage")) for f in finals)]]
    rows += [[f"final {c}", *(final_cell(a, c) for a in audits)] for c in columns]
    rows += [["final safety retention",
              *(fmt((f.get("safety_retention") or {}).get(f.get("final_stage"))) for f in finals)],
             ["BWT (tasks)", *(fmt(f.get("bwt"), signed=True) for f in finals)],
             ["average final task score", *(fmt(f.get("average_performance")) for f in finals)],
             ["over-refusal change", *(fmt(f.get("over_refusal_change"), signed=True) for f in finals)]]
    rows += [[f"forgetting {c}", *(fmt(f["forgetting"].get(c), signed=True) for f in finals)]
             for c in columns if any(c in f["forgetting"] for f in finals)]
    rows += [["started from", *((f"{a['started_from'].get('run')}:{a['started_from'].get('stage')}"
                                 if a.get("started_from") else "-") for a in audits)],
             ["train seconds (all stages)", *(fmt((a.get("cost") or {}).get("train_seconds"), 1) for a in audits)],
             ["mechanisms extra seconds", *(fmt((a.get("cost") or {}).get("extra_seconds"), 2) for a in audits)]]
    names = list(dict.fromkeys(st["name"] for a in audits for st in a["stages"]))
    for what, show in (("mechanisms", mechanism_names), ("verdict", lambda st: st["verdict"])):
        rows += [[f"{what} {name}", *(next((show(st) for st in a["stages"] if st["name"] == name), "-")
                                      for a in audits)] for name in names]
    return ["", *(a["name"] for a in audits)], rows


def format_comparison(audits: list[dict]) -> str:
    """Side by side: one column per run, the final numbers and each stage's verdict."""
    header, rows = comparison_rows(audits)
    return "comparison of " + ", ".join(a["name"] for a in audits) + "\n" + grid(header, rows)


def format_audit(doc: dict) -> str:
    """Every run of an audit document, then the side-by-side comparison when there are several."""
    parts = [format_run(a) for a in doc["runs"]]
    if len(doc["runs"]) > 1:
        parts.append(format_comparison(doc["runs"]))
    return ("\n\n" + "=" * 80 + "\n\n").join(parts)
