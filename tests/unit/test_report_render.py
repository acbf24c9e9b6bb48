"""The renderers, checked on what a user sees: report.md, report.json, the terminal summary, activity.svg."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from repro.errors import VdiagError
from repro.records import (
    REPORT_SCHEMA_VERSION,
    ActivitySample,
    Aliasing,
    Analysis,
    CollectorRun,
    CorruptionFinding,
    Divergence,
    EnvInfo,
    Frame,
    GpuKernel,
    GpuState,
    Hypothesis,
    LaunchEvent,
    RankSummary,
    Report,
    StackCluster,
    StackSample,
    ThreadStack,
    Verdict,
    WatchdogVerdict,
)
from repro.report import (
    RENDERERS,
    json_report,
    load_report,
    render_activity,
    render_markdown,
    render_terminal,
    schema,
)
from repro.report.markdown import MARKDOWN_LIMIT, table_ranks

KERNEL = "allreduce_fusion_kernel_oneshot_lamport<AllReduceFusionPattern::kARResidualRMSNorm, __nv_bfloat16, 2, true>"
HEADLINE = "Rank 0 spins in the fused all-reduce; its TP peer rank 1 finished with a wrong result."
T0 = 1_760_000_000.0

# ---- builders ------------------------------------------------------------------------------------------


def _pending(rank: int, *, layer: int = 3) -> LaunchEvent:
    return LaunchEvent(
        rank=rank,
        seq=1234,
        t=T0 + 40.0,
        call=1234,
        phase="capture",
        size=16,
        layer=layer,
        sub=1,
        op="fused",
        token_num=16,
        hidden=8192,
        dtype="bf16",
        oneshot=True,
        grid=(128, 1, 1),
        block=(128, 1, 1),
        cluster=(8, 1, 1),
        kernel=KERNEL,
    )


def _spinning_stack(rank: int) -> StackSample:
    return StackSample(
        rank=rank,
        pid=4100 + rank,
        source="py-spy --native",
        threads=[
            ThreadStack(
                thread="0x7F3A2B4C5740",
                name="MainThread",
                active=True,
                frames=[
                    Frame(function="cudaDeviceSynchronize", file="libcudart.so.12", native=True),
                    Frame(
                        function="synchronize",
                        file="/venv/lib/python3.11/site-packages/torch/cuda/__init__.py",
                        line=985,
                    ),
                    Frame(function="fused_add_rms_norm", file="/work/main/repro/backends/sim.py", line=212),
                    Frame(function="capture", file="/work/main/repro/engines/replay/replay.py", line=141),
                    Frame(function="main", file="/work/main/repro/engines/worker.py", line=40),
                ],
            )
        ],
    )


def _idle_stack(rank: int) -> StackSample:
    return StackSample(
        rank=rank,
        pid=4100 + rank,
        source="py-spy --native",
        threads=[
            ThreadStack(
                thread=f"0x7F3A2B4C57{40 + rank}",
                name="MainThread",
                active=False,
                frames=[
                    Frame(function="Event.wait", file="/usr/lib/python3.11/threading.py", line=607),
                    Frame(function="wait_for_peers", file="/work/main/repro/engines/replay/replay.py", line=188),
                    Frame(function="main", file="/work/main/repro/engines/worker.py", line=40),
                ],
            ),
            ThreadStack(
                thread="0x7F3A1A000640",
                name="heartbeat",
                frames=[Frame(function="sleep", file="/work/main/repro/engines/worker.py", line=22)],
            ),
        ],
    )


def _watchdog(*, cls: str = "spin-deadlock", busy: list[int], idle: list[int]) -> WatchdogVerdict:
    return WatchdogVerdict.model_validate(
        dict(
            cls=cls,
            stall_s=30.0,
            started_t=T0,
            last_progress_t=T0 + 40.0,
            verdict_t=T0 + 70.0,
            busy_ranks=busy,
            idle_ranks=idle,
            cpu_pct={r: (100.0 if r in busy else 0.5) for r in busy + idle},
            gpu_util={r: (100.0 if r in busy else 0.0) for r in busy + idle},
        )
    )


def _hypotheses() -> list[Hypothesis]:
    return [
        Hypothesis(
            key="workspace-aliasing",
            title="Workspace aliasing: both TP groups share the stage-0 Lamport buffers",
            status="consistent",
            score=0.35,
            evidence_for=["rank 2's workspace was rendezvoused over WORLD"],
            evidence_against=["ranks 2 and 3 got their own peer pointers"],
        ),
        Hypothesis(
            key="launch-divergence",
            title="Token-count divergence under one-shot",
            status="supported",
            score=0.92,
            evidence_for=[
                "call #1234: rank 0 launched 16 tokens, rank 1 launched 8",
                "rank 0 spins in the one-shot Lamport poll; rank 1 idles with a wrong result",
            ],
            evidence_against=["both ranks used the same capture size list"],
        ),
        Hypothesis(
            key="flag-out-of-step",
            title="Lamport flag out of step",
            status="refuted",
            score=0.05,
            evidence_against=["both ranks made 1233 one-shot calls before #1234"],
        ),
    ]


def spin_report(tmp_path: Path) -> Report:
    """PP=2 TP=2: rank 0 spins in the one-shot kernel with grid (128,1,1), ranks 1-3 idle on the host."""
    ranks = [
        RankSummary(
            rank=0,
            pp_stage=0,
            tp_rank=0,
            pid=4100,
            device="cuda:0",
            calls_done=1233,
            last_phase="capture",
            pending=_pending(0),
            state="spinning",
        ),
        RankSummary(
            rank=1,
            pp_stage=0,
            tp_rank=1,
            pid=4101,
            device="cuda:1",
            calls_done=1234,
            wrong_calls=1,
            last_phase="capture",
            state="idle",
        ),
        RankSummary(
            rank=2, pp_stage=1, tp_rank=0, pid=4102, calls_done=1300, last_phase="capture", state="idle"
        ),
        RankSummary(
            rank=3, pp_stage=1, tp_rank=1, pid=4103, calls_done=1300, last_phase="capture", state="idle"
        ),
    ]
    call = {"phase": "capture", "size": 16, "layer": 3, "sub": 1}
    analysis = Analysis(
        divergences=[
            Divergence(
                tp_group=(0, 1),
                index=1234,
                field="token_num",
                values={0: 16, 1: 8},
                call=call,
                text="rank 0 waits for 16 tokens of Lamport data; rank 1 sent 8",
            ),
            Divergence(tp_group=(0, 1), index=1234, field="grid", values={0: (128, 1, 1), 1: (64, 1, 1)}),
            Divergence(tp_group=(0, 1), index=1290, field="calls", values={0: 1233, 1: 1234}),
        ],
        aliasing=[
            Aliasing(
                ranks=(0, 1, 2, 3),
                rendezvous_groups={0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)},
                shared_buffers={},
                text="each TP group has its own workspace",
            )
        ],
        stack_clusters=[
            StackCluster(
                signature="sync", ranks=[0], top=["cudaDeviceSynchronize (libcudart.so.12)"], odd=True
            ),
            StackCluster(signature="wait", ranks=[1, 2, 3], top=["Event.wait (threading.py:607)"]),
        ],
        corruption=[
            CorruptionFinding(
                rank=1,
                wrong_calls=1,
                total_calls=1234,
                first=call,
                kind="missing_peer",
                detail="rows 8-15 hold rank 1's own input only",
            ),
        ],
        hypotheses=_hypotheses(),
        verdict=Verdict(
            cls="spin-deadlock",
            headline=HEADLINE,
            paragraph=(
                "At call #1234 (capture size=16, layer 3) rank 0 launched the one-shot kernel for 16 tokens, "
                "its peer for 8. Rank 0 polls for Lamport data that never comes; rank 1 returned a wrong sum."
            ),
            spinning=[0],
            idle=[1, 2, 3],
            kernel=KERNEL,
            call=call,
            top_hypothesis="launch-divergence",
        ),
        grid_checks=["rank 0: grid (128,1,1) matches the launcher arithmetic for T=16 on 132 SMs"],
    )
    return Report(
        vdiag_version="0.1.0",
        scenario_name="pp2-tp2-token-divergence",
        scenario_file="presets/pp2-tp2-token-divergence.yaml",
        scenario_yaml="name: pp2-tp2-token-divergence\nlayout: {tp: 2, pp: 2}\nfault:\n  token_divergence: {rank: 1, call: 1234}\n",
        run_dir=str(tmp_path),
        started="2026-06-01T12:00:00Z",
        duration_s=71.5,
        backend="sim",
        engine="replay",
        world_size=4,
        tp=2,
        pp=2,
        fusion_enabled=True,
        payload_width=64,
        hidden=8192,
        exit_code=1,
        expect="hang",
        ranks=ranks,
        watchdog=_watchdog(busy=[0], idle=[1, 2, 3]),
        analysis=analysis,
        stacks=[_spinning_stack(0), _idle_stack(1), _idle_stack(2), _idle_stack(3)],
        gpu=[
            GpuState(
                rank=0,
                pid=4100,
                source="cuda-gdb attach",
                seconds=11.4,
                kernels=[
                    GpuKernel(
                        name=KERNEL,
                        device=0,
                        grid=(128, 1, 1),
                        block=(128, 1, 1),
                        cluster=(8, 1, 1),
                        running_blocks=128,
                        block_ranges=["(0,0,0)-(127,0,0)"],
                    )
                ],
            ),
            *[GpuState(rank=r, pid=4100 + r, source="cuda-gdb attach", seconds=10.9) for r in (1, 2, 3)],
        ],
        collectors=[
            *[CollectorRun(name="py-spy", rank=r, ok=True, seconds=0.07) for r in range(4)],
            CollectorRun(name="cuda-gdb", rank=0, ok=True, seconds=11.4),
            CollectorRun(
                name="nvml",
                ok=False,
                seconds=0.01,
                error="NVML Shared Library Not Found",
                advice="install the NVIDIA driver's libnvidia-ml.so or run on the GPU host",
            ),
        ],
        env=EnvInfo(
            python="3.11.7",
            platform="Linux-6.8.0-x86_64-with-glibc2.36",
            versions={"torch": "2.8.0", "flashinfer-python": "0.6.12", "vllm": "0.11.0"},
            driver="580.65.06",
            gpus=["NVIDIA H100 80GB HBM3"] * 4,
            topology="GPU0\tX\tNV18\nGPU1\tNV18\tX",
            variables={"NCCL_DEBUG": "WARN", "HF_TOKEN": "***"},
            command_line="vdiag run presets/pp2-tp2-token-divergence.yaml",
        ),
        activity_plot=str(tmp_path / "activity.svg"),
        notes=[],
    )


def clean_report(tmp_path: Path) -> Report:
    ranks = [
        RankSummary(rank=r, pp_stage=0, tp_rank=r, calls_done=5100, last_phase="capture", state="finished")
        for r in range(2)
    ]
    return Report(
        vdiag_version="0.1.0",
        scenario_name="tp2-clean",
        scenario_file="",
        scenario_yaml="name: tp2-clean\n",
        run_dir=str(tmp_path),
        started="2026-06-01T12:00:00Z",
        duration_s=12.0,
        backend="sim",
        engine="replay",
        world_size=2,
        tp=2,
        pp=1,
        fusion_enabled=True,
        payload_width=8192,
        hidden=8192,
        exit_code=0,
        ranks=ranks,
        watchdog=WatchdogVerdict(
            cls="clean",
            stall_s=30.0,
            started_t=T0,
            last_progress_t=T0 + 11.0,
            verdict_t=T0 + 12.0,
            finished_ranks=[0, 1],
        ),
        analysis=Analysis(
            verdict=Verdict(
                cls="clean",
                headline="Both ranks finished; every result was right.",
                paragraph="5100 calls per rank, 0 wrong.",
            )
        ),
    )


def _deep_stack(rank: int, depth: int) -> StackSample:
    frames = [
        Frame(
            # the innermost frame is shared, the callers differ per rank: no two stacks group
            function=f"layer_{i}_forward_with_a_rather_long_function_name" + (f"_{rank}" if i else ""),
            file=f"/opt/conda/envs/serving/lib/python3.11/site-packages/vllm/model_executor/models/llama_{i}.py",
            line=1000 + rank * 7 + i,  # every rank's functions differ: no two stacks group
        )
        for i in range(depth)
    ]
    return StackSample(
        rank=rank,
        pid=9000 + rank,
        source="py-spy",
        threads=[
            ThreadStack(thread=hex(0x7F0000 + rank), name="MainThread", active=rank == 0, frames=frames)
        ],
    )


def big_report(tmp_path: Path, *, distinct: bool) -> Report:
    """64 ranks, PP=8 TP=8: rank 0 spins, rank 1 finished wrong, ranks 2-63 idle. Optionally everything differs."""
    base = spin_report(tmp_path)
    ranks = []
    for r in range(64):
        stage, tp_rank = divmod(r, 8)
        state = "spinning" if r == 0 else "idle"
        pending = _pending(r, layer=r if distinct else 3) if (r == 0 or distinct) else None
        ranks.append(
            RankSummary(
                rank=r,
                pp_stage=stage,
                tp_rank=tp_rank,
                calls_done=4000 + (r % 3),
                last_phase="capture",
                pending=pending,
                state=state,
                wrong_calls=1 if r == 1 else 0,
            )
        )
    if distinct:
        stacks = [_deep_stack(r, 150) for r in range(64)]
    else:
        stacks = [_spinning_stack(0)] + [_idle_stack(r) for r in range(1, 64)]
    analysis = base.analysis.model_copy(update={"stack_clusters": []})
    return base.model_copy(
        update={
            "scenario_name": "pp8-tp8-token-divergence",
            "world_size": 64,
            "tp": 8,
            "pp": 8,
            "ranks": ranks,
            "stacks": stacks,
            "analysis": analysis,
            "watchdog": _watchdog(busy=[0], idle=list(range(1, 64))),
            "gpu": [GpuState(rank=r, pid=9000 + r, source="cuda core dump") for r in range(1, 64)]
            + base.gpu[:1],
            "scenario_yaml": "".join(
                f"# padding line {i} of a very long scenario file\n" for i in range(3000)
            ),
            "env": base.env.model_copy(
                update={"topology": "\n".join(f"GPU{i}\t" + "NV18\t" * 64 for i in range(64))}
            ),
        }
    )


def _activity(n_ranks: int, n_samples: int, *, spinning: int = 0) -> list[ActivitySample]:
    out = []
    for i in range(n_samples):
        for r in range(n_ranks):
            stalled = i > n_samples // 2
            cpu = 99.0 + (i % 3) * 0.3 if r == spinning and stalled else 3.0 + (i * 7 + r) % 11
            out.append(
                ActivitySample(
                    t=T0 + 0.5 * i,
                    rank=r,
                    cpu_pct=cpu,
                    progress=min(i, n_samples // 2) * 10 + r,
                    gpu_util=100.0 if r == spinning and stalled else float((i * 13 + r) % 40),
                )
            )
    return out


# ---- report.md -----------------------------------------------------------------------------------------


def test_markdown_starts_with_the_verdict_and_summary_before_any_detail(tmp_path: Path) -> None:
    md = render_markdown(spin_report(tmp_path))
    first_line = md.splitlines()[0]
    assert "spin-deadlock" in first_line and "pp2-tp2-token-divergence" in first_line
    order = [md.index(HEADLINE), md.index("## Ranks"), md.index("## Hypotheses"), md.index("<details>")]
    assert order == sorted(order)
    assert md.rstrip().endswith(
        "**Exit code 1**: failure reproduced: a hang, or silent corruption (wrong results)."
    )


def test_markdown_ranks_table_shows_spinning_rank_with_its_pending_launch(tmp_path: Path) -> None:
    md = render_markdown(spin_report(tmp_path))
    row0 = next(line for line in md.splitlines() if line.startswith("| **rank 0**"))
    assert "**spinning**" in row0
    assert "capture size=16 layer=3 sub=1 oneshot grid=(128,1,1) block=(128,1,1) cluster=(8,1,1)" in row0
    row1 = next(line for line in md.splitlines() if line.startswith("| **rank 1**"))
    assert "| idle |" in row1 or "**idle**" in row1
    assert "| 1 |" in row1  # the wrong call
    assert any(line.startswith("| ranks 2,3 | 1 | 0,1 | idle |") for line in md.splitlines())


def test_markdown_hypotheses_are_ranked_with_evidence_for_and_against(tmp_path: Path) -> None:
    md = render_markdown(spin_report(tmp_path))
    table = md[md.index("## Hypotheses") : md.index("### Evidence")]
    assert (
        table.index("Token-count divergence")
        < table.index("Workspace aliasing")
        < table.index("Lamport flag")
    )
    assert "| **supported** | 0.92 | Token-count divergence under one-shot |" in table
    assert "- for: call #1234: rank 0 launched 16 tokens, rank 1 launched 8" in md
    assert "- against: both ranks used the same capture size list" in md


def test_markdown_groups_identical_stacks_and_puts_the_odd_rank_first(tmp_path: Path) -> None:
    md = render_markdown(spin_report(tmp_path))
    stacks = md[md.index("<summary>Stacks") :]
    assert "rank 0: active in `cudaDeviceSynchronize (libcudart.so.12)` ← odd one out" in stacks
    assert "ranks 1,2,3: idle in `Event.wait (threading.py:607)`" in stacks
    assert stacks.index("rank 0: active") < stacks.index("ranks 1,2,3: idle")
    # py-spy's shape: thread header, then frames innermost first as `function (file:line)`
    assert (
        'Thread 0x7F3A2B4C5740 (active): "MainThread"\n    cudaDeviceSynchronize (libcudart.so.12)\n'
        in stacks
    )
    assert "    Event.wait (/usr/lib/python3.11/threading.py:607)\n    wait_for_peers" in stacks
    assert stacks.count("Event.wait (/usr/lib/python3.11/threading.py:607)") == 1  # one representative


def test_markdown_details_name_kernel_grid_divergence_and_failed_collector(tmp_path: Path) -> None:
    md = render_markdown(spin_report(tmp_path))
    gpu_row = next(line for line in md.splitlines() if line.startswith("| rank 0 | `allreduce_fusion_kernel"))
    assert "| (128,1,1) | (128,1,1) | (8,1,1) | 128 ((0,0,0)-(127,0,0)) | cuda-gdb attach |" in gpu_row
    assert "| ranks 1,2,3 | no kernel running |" in md
    assert "**TP group (0,1)**: first divergent call #1234 (capture size=16 layer=3 sub=1)" in md
    assert "- `token_num`: rank 0: 16, rank 1: 8" in md
    assert "- `grid`: rank 0: (128,1,1), rank 1: (64,1,1)" in md
    assert "- 1 later divergent call in this group" in md
    assert "**nvml**, 0.0 s: NVML Shared Library Not Found" in md
    assert "what to do: install the NVIDIA driver's libnvidia-ml.so" in md
    assert "| 1 | 1 / 1234 | missing_peer |" in md
    assert "- workspace rendezvoused over (0,1) by ranks 0,1" in md


def test_markdown_links_activity_plot_notes_scaled_payload_and_embeds_env_and_scenario(
    tmp_path: Path,
) -> None:
    md = render_markdown(spin_report(tmp_path))
    assert "![activity](activity.svg)" in md
    assert "payload scaled: the sim carried 64 of 8192 elements per token" in md
    env = md[md.index("<summary>Environment</summary>") :]
    assert (
        env.index("```text\nvdiag version: 0.1.0")
        < env.index("flashinfer-python: 0.6.12")
        < env.index("</details>")
    )
    assert "  GPU 3: NVIDIA H100 80GB HBM3" in env
    assert "```yaml\nname: pp2-tp2-token-divergence\n" in md
    # kernel names with template brackets stay visible on GitHub (code span, not raw HTML)
    assert f"`{KERNEL}`" in md


def test_markdown_collapses_64_ranks_into_rows_and_keeps_outliers(tmp_path: Path) -> None:
    md = render_markdown(big_report(tmp_path, distinct=False))
    ranks_table = md[md.index("## Ranks") : md.index("## Hypotheses")]
    rows = [line for line in ranks_table.splitlines() if re.match(r"\| (\*\*)?ranks? \d", line)]
    assert len(rows) == 3
    assert rows[0].startswith("| **rank 0** | 0 | 0 | **spinning** |")
    assert rows[1].startswith("| **rank 1** | 0 | 1 |")
    assert rows[2].startswith("| ranks 2-63 | 0-7 | 0-7 | idle | capture | 4000-4002 | 0 |")
    assert "ranks 1-63: idle in `Event.wait (threading.py:607)`" in md
    assert "| ranks 1-63 | no kernel running |" in md
    assert len(md) < MARKDOWN_LIMIT


def test_markdown_stays_under_github_limit_with_64_distinct_long_stacks(tmp_path: Path) -> None:
    report = big_report(tmp_path, distinct=True)
    md = render_markdown(report)
    assert len(md) < 65_000
    # the summary is whole and first; the details say what was left out and where to find it
    assert md.index(HEADLINE) < md.index("## Ranks")
    assert report.analysis.verdict.paragraph in md
    assert "more stack groups in report.json_" in md
    assert "more lines of the scenario YAML in report.json_" in md
    # truncated sections still close their HTML and fences
    assert md.count("<details>") == md.count("</details>")
    assert md.count("```yaml") == 1
    # the spinning rank is still spelled out, and every rank row is there
    assert "| **rank 0** | 0 | 0 | **spinning** |" in md
    assert "| rank 63 | 7 | 7 | idle |" in md
    assert "rank 0: active in `layer_0_forward_with_a_rather_long_function_name" in md
    assert "more frames (outermost)" in md
    assert md.rstrip().endswith("(wrong results).")


def test_markdown_keeps_the_size_promise_even_with_an_absurd_verdict_text(tmp_path: Path) -> None:
    report = spin_report(tmp_path)
    verdict = report.analysis.verdict.model_copy(update={"paragraph": "x" * 200_000})
    report = report.model_copy(update={"analysis": report.analysis.model_copy(update={"verdict": verdict})})
    md = render_markdown(report)
    assert len(md) < MARKDOWN_LIMIT
    assert md.startswith("# vdiag: spin-deadlock") and HEADLINE in md
    assert md.rstrip().endswith("(wrong results).")


def test_markdown_of_clean_run_says_so_and_exits_zero(tmp_path: Path) -> None:
    md = render_markdown(clean_report(tmp_path))
    assert md.startswith("# vdiag: clean in tp2-clean\n\n**Both ranks finished; every result was right.**")
    assert "| ranks 0,1 | 0 | 0,1 | finished | capture | 5100 | 0 |  |" in md
    assert "<summary>Stacks" not in md and "payload scaled" not in md
    assert "**Exit code 0**: clean: the run finished and every checked result was right." in md


def test_format_ranks_lists_short_runs_and_collapses_long_ones() -> None:
    assert table_ranks([3, 1, 2]) == "1,2,3"
    assert table_ranks([0, *range(4, 64)]) == "0,4-63"
    assert table_ranks([]) == ""


# ---- report.json ---------------------------------------------------------------------------------------


def test_json_round_trips_through_load_report(tmp_path: Path) -> None:
    report = spin_report(tmp_path)
    out = tmp_path / "report.json"
    json_report.render(report, out)
    data = json.loads(out.read_text())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION
    assert data["ranks"][0]["pending"]["grid"] == [128, 1, 1]
    loaded = load_report(out)
    # tuples inside free-form values (Divergence.values: dict[int, Any]) come back as JSON lists
    assert loaded.model_dump(mode="json") == report.model_dump(mode="json")
    assert loaded.ranks == report.ranks and loaded.gpu == report.gpu and loaded.stacks == report.stacks
    assert loaded.analysis.divergences[0].values == {0: 16, 1: 8}
    assert render_markdown(loaded) == render_markdown(report)


def test_load_report_refuses_other_major_versions_and_non_reports(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    json_report.render(spin_report(tmp_path), out)
    data = json.loads(out.read_text())
    data["schema_version"] = "2.0"
    out.write_text(json.dumps(data))
    with pytest.raises(VdiagError, match=r"schema 2\.0"):
        load_report(out)
    out.write_text('{"hello": 1}')
    with pytest.raises(VdiagError, match="not a vdiag report"):
        load_report(out)
    with pytest.raises(VdiagError, match="cannot read"):
        load_report(tmp_path / "missing.json")


def test_schema_describes_every_top_level_field_with_its_version() -> None:
    s = schema()
    assert s["x-report-schema-version"] == REPORT_SCHEMA_VERSION
    assert set(Report.model_fields) <= set(s["properties"])
    assert "vdiag_version" in s["required"] and "watchdog" in s["required"]


# ---- terminal --------------------------------------------------------------------------------------------


def test_terminal_prints_verdict_ranks_hypotheses_and_report_path(tmp_path: Path) -> None:
    console = Console(record=True, width=140, file=io.StringIO())
    render_terminal(spin_report(tmp_path), console)
    text = console.export_text()
    assert "spin-deadlock" in text and "pp2-tp2-token-divergence" in text
    assert HEADLINE.split(";")[0] in text
    assert "spinning" in text and "ranks 2,3" in text
    assert text.index("Token-count divergence") < text.index("Workspace aliasing")
    assert "Lamport flag" not in text or text.index("Workspace aliasing") < text.index("Lamport flag")
    assert str(tmp_path / "report.md") in text
    assert "1 collector run failed" in text


def test_terminal_at_64_ranks_stays_compact_and_keeps_the_outliers(tmp_path: Path) -> None:
    console = Console(record=True, width=160, file=io.StringIO())
    render_terminal(big_report(tmp_path, distinct=True), console)
    lines = console.export_text().splitlines()
    assert len(lines) < 50
    assert any(line.startswith("rank 0 ") and "spinning" in line for line in lines)
    assert any(line.startswith("rank 1 ") for line in lines)
    assert any("48 more rows in report.md" in line for line in lines)

    console = Console(record=True, width=160, file=io.StringIO())
    render_terminal(big_report(tmp_path, distinct=False), console)
    text = console.export_text()
    assert "ranks 2-63" in text and "rank 63" not in text


def test_terminal_of_clean_run_is_green_and_shows_exit_zero(tmp_path: Path) -> None:
    console = Console(
        record=True, width=120, file=io.StringIO(), force_terminal=True, color_system="truecolor"
    )
    render_terminal(clean_report(tmp_path), console)
    styled = console.export_text(styles=True, clear=False)
    plain = console.export_text()
    assert "clean" in plain and "exit 0: clean" in plain
    assert "\x1b[" in styled and "32" in styled  # green, ANSI


# ---- activity.svg ----------------------------------------------------------------------------------------


def test_activity_svg_for_four_ranks_is_valid_xml_with_lanes_and_markers(tmp_path: Path) -> None:
    out = render_activity(
        _activity(4, 120),
        tmp_path / "activity.svg",
        ranks_meta={0: "r0 pp0 tp0", 1: "r1 pp0 tp1", 2: "r2 pp1 tp0", 3: "r3 pp1 tp1"},
        stall_t=T0 + 30.0,
        verdict_t=T0 + 60.0,
    )
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = out.read_text()
    assert "r0 pp0 tp0" in text and "r3 pp1 tp1" in text
    assert "suspected stall" in text and "verdict" in text and "GPU util" in text
    assert "seconds since first sample" in text


def test_activity_svg_for_64_ranks_stays_small(tmp_path: Path) -> None:
    out = render_activity(_activity(64, 200, spinning=5), tmp_path / "activity.svg", stall_t=T0 + 50.0)
    ET.parse(out)
    text = out.read_text()
    assert "rank 63" in text and "rank 0" in text
    assert out.stat().st_size < 300_000


def test_activity_svg_without_samples_says_so(tmp_path: Path) -> None:
    out = render_activity([], tmp_path / "sub" / "activity.svg")
    assert ET.parse(out).getroot().tag.endswith("svg")
    assert "no samples" in out.read_text()


# ---- the registry ----------------------------------------------------------------------------------------


def test_every_registered_renderer_writes_its_file(tmp_path: Path) -> None:
    report = spin_report(tmp_path)
    assert set(RENDERERS) == {"markdown", "json", "terminal"}
    for name, render in RENDERERS.items():
        out = tmp_path / f"out.{name}"
        render(report, out)
        assert out.stat().st_size > 0
    assert (tmp_path / "out.markdown").read_text().startswith("# vdiag: spin-deadlock")
    assert load_report(tmp_path / "out.json").model_dump(mode="json") == report.model_dump(mode="json")
    assert "\x1b[" not in (tmp_path / "out.terminal").read_text()
    assert HEADLINE.split(";")[0] in (tmp_path / "out.terminal").read_text()
