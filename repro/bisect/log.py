"""The bisect log: bisect.md (for people) and bisect.json (for machines), rewritten after every step."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from repro.bisect.common import BisectResult, Step, fmt_s


def _rel(path: str, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return path


def write_log(res: BisectResult) -> None:
    """bisect.md and bisect.json, from the result as it stands (called after every step)."""
    res.log_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(res)
    data["log_dir"] = str(res.log_dir)
    data["policy"] = {**asdict(res.policy), "clean_runs_for_good": res.policy.clean_needed,
                      "rule": res.policy.describe()}
    data["exit_code"] = res.exit_code
    data["runs"] = res.runs
    tmp = res.bisect_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, res.bisect_json)
    tmp = res.bisect_md.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(res))
    os.replace(tmp, res.bisect_md)


def render_markdown(res: BisectResult) -> str:
    what = "commit" if res.mode == "git" else "version"
    lines = [f"# vdiag bisect: {Path(res.scenario).stem}", ""]
    if res.status == "found":
        lines.append(f"**first bad {what}: {res.first_bad_label}**")
        if res.last_good:
            lines += ["", f"last good {what}: {res.last_good}"]
        if res.diffstat:
            lines += ["", "```", res.diffstat.rstrip("\n"), "```"]
    elif res.status == "inconclusive":
        lines.append(f"**inconclusive: skipped steps leave {len(res.candidates)} candidates for the first bad {what}**")
        lines += [""] + [f"- {c}" for c in res.candidates]
    elif res.status == "error":
        lines.append(f"**stopped: {res.error}**")
    elif res.status == "interrupted":
        lines.append("**interrupted (Ctrl-C): the steps below were judged before it**")
    else:
        lines.append("**running**")
    lines.append("")
    if res.mode == "git":
        lines.append(f"- repository: `{res.target}`, good `{res.good[:12]}`, bad `{res.bad[:12]}`")
    else:
        n = len(res.versions)
        lines.append(f"- package: `{res.target}` from {res.good} (good) to {res.bad} (bad), {n} versions in between"
                     f" and at the ends")
    lines.append(f"- scenario: `{res.scenario}`")
    lines.append(f"- rule: {res.rule_text or res.policy.describe()}")
    lines.append(f"- {res.runs} runs in {len(res.steps)} steps, {fmt_s(res.seconds)}")
    lines.extend(f"- note: {n}" for n in res.notes)
    bayes = res.search == "bayes"
    head = f"| # | {what} | verdict | runs | started (UTC) | took | why | report |"
    lines += ["", "## Steps", "", head + (" posterior after (top candidates) |" if bayes else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if bayes else "")]
    i = 0
    for st in res.steps:
        if st.role == "step":
            i += 1
        num = str(i) if st.role == "step" else st.role
        report = ""
        if len(st.runs) == 1:
            report = f"[report]({_rel(st.runs[0].report_md, res.log_dir)})"
        elif st.runs:
            report = ", ".join(f"[run {i}]({_rel(r.report_md, res.log_dir)})" for i, r in enumerate(st.runs, 1))
        elif st.setup_log:
            report = f"[setup log]({_rel(st.setup_log, res.log_dir)})"
        label = st.label.replace("|", "\\|")
        why = st.reason.replace("|", "\\|").replace("\n", " ")
        runs = ", ".join(r.short() for r in st.runs) or "-"
        started = st.started[11:19] if len(st.started) >= 19 else st.started
        row = f"| {num} | `{label}` | {st.verdict} | {runs} | {started} | {st.seconds:.1f} s | {why} | {report} |"
        if bayes:
            row += " " + (", ".join(f"`{lab.split()[0]}` {p:.3f}" for lab, p in st.posterior) or "-") + " |"
        lines.append(row)
    lines.append("")
    read_steps: dict[str, Step] = {}
    for st in res.steps:
        if st.reads:
            read_steps.setdefault(st.rev, st)  # the same checkout reads the same every time
    if read_steps:
        lines += ["## What each step read from its checkout (hook: vllm-source)", ""]
        for st in read_steps.values():
            lines.append(f"- `{st.label}`" + (f" ({st.role})" if st.role != "step" else "") + ":")
            lines.extend(f"  - {r}" for r in st.reads)
        lines.append("")
    if res.mode == "git" and (res.log_dir / "git-bisect.log").exists():
        lines += ["`git bisect log`: [git-bisect.log](git-bisect.log)", ""]
    return "\n".join(lines)


