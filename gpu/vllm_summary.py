"""One JSON summary of the vdiag run folders under a reports folder (used by gpu/vllm-validate.sh).

    python3 gpu/vllm_summary.py REPORTS_DIR [--rc NAME=CODE ...] > summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def summarise(run: Path) -> dict[str, Any]:
    try:
        rep = json.loads((run / "report.json").read_text())
    except (OSError, ValueError) as e:
        return {"run": run.name, "error": f"no report.json ({e})"}
    an = rep.get("analysis", {})
    verdict = an.get("verdict", {})
    hyps = sorted(an.get("hypotheses", []), key=lambda h: -float(h.get("score", 0)))
    facts: list[dict[str, Any]] = []
    for f in sorted((run / "vllm").glob("rank*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        facts.append({k: d.get(k) for k in ("rank", "startup_s", "resolved", "error", "flashinfer_version")}
                     | {"vllm": d.get("vllm", {}).get("version"),
                        "llm_kwargs": d.get("plan", {}).get("llm_kwargs")})
    phases: list[str] = []
    for log in sorted((run / "launch").glob("rank*.jsonl")):
        for line in log.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("ev") == "phase":
                label = str(ev.get("phase"))
                if ev.get("index") is not None:
                    label += f" {ev.get('index')}/{ev.get('total')} size {ev.get('size')}"
                phases.append(label)
    wd = rep.get("watchdog", {})
    return {
        "run": run.name, "scenario": rep.get("scenario_name"), "exit_code": rep.get("exit_code"),
        "expect": rep.get("expect"), "duration_s": rep.get("duration_s"), "watchdog": wd.get("cls"),
        "idle": wd.get("idle_ranks"), "busy": wd.get("busy_ranks"), "crashed": wd.get("crashed"),
        "gpu_util": wd.get("gpu_util"), "cpu_pct": wd.get("cpu_pct"),
        "verdict": verdict.get("headline"), "top_hypothesis": verdict.get("top_hypothesis"),
        "hypotheses": [(h.get("key"), h.get("status"), h.get("score")) for h in hyps[:4]],
        "versions": {k: v for k, v in rep.get("env", {}).get("versions", {}).items()
                     if k in ("vllm", "vllm.commit", "flashinfer", "torch", "cuda", "driver")},
        "gpus": rep.get("env", {}).get("gpus"), "driver": rep.get("env", {}).get("driver"),
        "notes": rep.get("notes", []), "phases": phases[-40:], "facts": facts,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", type=Path)
    ap.add_argument("--rc", action="append", default=[], help="NAME=CODE: the exit code vdiag returned")
    a = ap.parse_args()
    runs = sorted(p for p in a.reports.iterdir() if p.is_dir()) if a.reports.is_dir() else []
    out = {"exit_codes": dict(x.split("=", 1) for x in a.rc), "runs": [summarise(r) for r in runs]}
    json.dump(out, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
