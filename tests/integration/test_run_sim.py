"""End to end on the CPU: real `vdiag run`, real torchrun workers, the sim backend, real py-spy.

Each scenario runs once per session (fixtures) and several tests read what the user would see.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import SCENARIOS, VdiagRun, leftovers, run_vdiag, shm_names

HANG = {"spin-deadlock", "all-spinning", "host-wait"}
SMALL = ["--set", "capture.sizes=[32,24,16,8,4,2,1]"]


def _run(session_reports: Path, name: str, *extra: str) -> VdiagRun:
    tag = hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8] if extra else "default"
    out = session_reports / f"{name}-{tag}"
    return run_vdiag(["run", str(SCENARIOS / f"{name}.yaml"), *extra], out)


@pytest.fixture(scope="session")
def seed(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "llama70b-pp2-tp2-fusion")


@pytest.fixture(scope="session")
def missing_peer(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "mech-missing-peer")


@pytest.fixture(scope="session")
def token_divergence(session_reports: Path) -> VdiagRun:
    return _run(session_reports, "mech-token-divergence")


# ---- the seed case ------------------------------------------------------------------------------


def test_seed_scenario_hangs_and_names_aliasing(seed: VdiagRun) -> None:
    assert seed.rc == 1, seed.stderr
    rep = seed.report
    v = rep["analysis"]["verdict"]
    assert v["cls"] in HANG
    assert v["spinning"], "the report must name the spinning ranks"
    top = rep["analysis"]["hypotheses"][0]
    assert top["key"] == "workspace-aliasing" and top["status"] == "supported"
    md = seed.markdown
    assert md.splitlines()[0].startswith("# vdiag:")
    assert "allreduce_fusion_kernel_" in md
    assert "rendezvoused their workspace over 0-3 instead of their TP group" in md
    assert len(md) < 65_000
    # every hypothesis carries a status
    assert {h["key"] for h in rep["analysis"]["hypotheses"]} >= {
        "launch-divergence", "protocol-mismatch", "workspace-aliasing", "missing-peer", "flag-out-of-step",
        "host-collective",
    }
    assert "payload scaled" in md
    # the headline paragraph stays short; the per-rank details are in their sections
    assert len(rep["analysis"]["verdict"]["paragraph"]) < 700, rep["analysis"]["verdict"]["paragraph"]
    assert {w["rank"] for w in rep["analysis"]["verdict"]["ranks"]} == set(range(4))


def test_seed_run_keeps_launch_logs_stacks_and_leaves_nothing(seed: VdiagRun) -> None:
    rd = seed.run_dir
    for r in range(4):
        log = (rd / "launch" / f"rank{r}.jsonl").read_text()
        assert '"ev":"launch"' in log
        assert (rd / "stacks" / f"rank{r}.txt").exists()
    rep = seed.report
    pending = [r["pending"] for r in rep["ranks"] if r["state"] == "spinning"]
    assert pending and all(p is not None and p["op"] == "fused" and p["grid"] for p in pending)
    assert (rd / "activity.svg").read_text().lstrip().startswith("<")
    assert (rd / "env.json").exists()
    assert leftovers(rd) == []
    assert not any(rd.name in n for n in shm_names())


def test_report_renders_again_from_its_records(seed: VdiagRun, tmp_path: Path) -> None:
    before = seed.markdown
    (seed.run_dir / "report.md").unlink()
    again = run_vdiag(["report", str(seed.run_dir)], tmp_path)
    assert again.rc == 0, again.stderr
    assert (seed.run_dir / "report.md").read_text() == before


# Fields that report.json gained with the typed records (issue 16): an older vdiag's report.json has none.
NEWER_FIELDS = {"ev", "graph", "kinds"}


def _drop(data: object) -> object:
    if isinstance(data, dict):
        return {k: _drop(v) for k, v in data.items() if k not in NEWER_FIELDS}
    if isinstance(data, list):
        return [_drop(v) for v in data]
    return data


def test_an_older_report_json_still_renders(seed: VdiagRun, tmp_path: Path) -> None:
    import json
    import shutil

    old = tmp_path / seed.run_dir.name
    shutil.copytree(seed.run_dir, old)
    data = json.loads((old / "report.json").read_text())
    (old / "report.json").write_text(json.dumps(_drop(data), indent=2))
    (old / "report.md").unlink()
    again = run_vdiag(["report", str(old)], tmp_path / "out")  # the suite's strict records: unknown fields fail
    assert again.rc == 0, again.stderr
    assert (old / "report.md").read_text() == (seed.run_dir / "report.md").read_text().replace(
        str(seed.run_dir), str(old))


# ---- the fixes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama70b-pp2-tp2-fusion-auto", "llama70b-pp2-tp2-fusion-tpgroup"])
def test_fixed_variants_run_clean(session_reports: Path, name: str) -> None:
    r = _run(session_reports, name, "--set", "model.num_layers=2", "--set", "capture.sizes=[512,256,17,16,1]")
    assert r.rc == 0, r.stderr + r.markdown[:2000]
    rep = r.report
    assert rep["analysis"]["verdict"]["cls"] == "clean"
    assert all(x["wrong_calls"] == 0 and x["state"] == "finished" for x in rep["ranks"])
    assert rep["fusion_enabled"] is (name.endswith("tpgroup"))
    assert leftovers(r.run_dir) == []


# ---- one scenario per mechanism -----------------------------------------------------------------


def test_token_divergence_names_the_first_divergent_call(token_divergence: VdiagRun) -> None:
    r = token_divergence
    assert r.rc == 1
    a = r.report["analysis"]
    div = [d for d in a["divergences"] if d["field"] == "token_num"]
    assert div, a["divergences"]
    assert div[0]["values"] == {"0": 17, "1": 16}
    assert div[0]["call"]["phase"] == "capture" and div[0]["call"]["size"] == 16 and div[0]["call"]["layer"] == 0
    assert a["hypotheses"][0]["key"] == "launch-divergence"
    assert 0 in a["verdict"]["spinning"], "the rank with more tokens spins"


def test_protocol_mismatch_is_told_apart(session_reports: Path) -> None:
    r = _run(session_reports, "mech-protocol-mismatch")
    assert r.rc == 1
    a = r.report["analysis"]
    assert any(d["field"] == "oneshot" for d in a["divergences"])
    assert a["hypotheses"][0]["key"] == "protocol-mismatch"


def test_missing_peer_spins_one_rank_and_idles_the_other(missing_peer: VdiagRun) -> None:
    r = missing_peer
    assert r.rc == 1
    v = r.report["analysis"]["verdict"]
    assert v["cls"] == "spin-deadlock"
    assert v["spinning"] == [0] and v["idle"] == [1]
    assert r.report["analysis"]["hypotheses"][0]["key"] == "missing-peer"
    assert "host-side all_reduce" in v["paragraph"]
    # py-spy's stacks show where each rank waits
    st = {s["rank"]: s for s in r.report["stacks"]}
    assert st[0]["source"].startswith("py-spy")
    frames0 = " ".join(f["function"] for t in st[0]["threads"] for f in t["frames"])
    assert "_oneshot" in frames0


def test_every_call_but_the_hung_one_has_its_checked_result(missing_peer: VdiagRun, token_divergence: VdiagRun) -> None:
    """A rank that hangs has a checked result, with the call's own duration, for every call it finished."""
    from repro.events import read_rank_log

    for run in (missing_peer, token_divergence):
        for log in sorted((run.run_dir / "launch").glob("rank*.jsonl")):
            rl = read_rank_log(log, -1)
            pending = rl.pending_launch()
            hung = {pending.seq} if pending is not None else set()
            assert [r.seq for r in rl.results] == [ev.seq for ev in rl.launches if ev.seq not in hung], log
            assert all(r.call_s is not None and r.call_s >= 0 for r in rl.results)
        assert any(read_rank_log(log, -1).pending_launch() for log in (run.run_dir / "launch").glob("rank*.jsonl"))


def test_flag_offset_fails_and_points_at_the_flag(session_reports: Path) -> None:
    r = _run(session_reports, "mech-flag-offset")
    assert r.rc == 1
    keys = {h["key"]: h for h in r.report["analysis"]["hypotheses"]}
    assert keys["flag-out-of-step"]["status"] in ("supported", "consistent")
    assert keys["launch-divergence"]["status"] == "refuted"


def test_delay_longer_than_the_floor_is_slow_not_a_hang(session_reports: Path) -> None:
    r = _run(session_reports, "mech-delay")
    assert r.rc == 0, r.markdown[:3000]
    assert r.report["watchdog"]["cls"] == "slow"
    assert r.report["watchdog"]["slow_resumed"] >= 1
    assert "slow" in r.markdown.splitlines()[0]


@pytest.mark.parametrize("name", ["tp4-clean", "tp8-llama405b"])
def test_tp4_and_tp8_start_ups_run_clean(session_reports: Path, name: str) -> None:
    r = _run(session_reports, name, "--set", "model.num_layers=1", "--set", "capture.sizes=[64,16,8,1]")
    assert r.rc == 0, r.markdown[:3000]
    assert r.report["world_size"] == (4 if name == "tp4-clean" else 8)
    assert all(x["wrong_calls"] == 0 for x in r.report["ranks"])


def test_narrow_payload_does_not_change_who_hangs(session_reports: Path) -> None:
    """docs/mechanisms.md, "Payload scaling": the protocols do not depend on the row width. Full width and the sim's width agree."""
    args = ["--set", "model=llama-3.1-8b", "--set", "model.num_layers=2"]
    full = _run(session_reports, "mech-missing-peer", *args, "--set", "sim.payload_width=4096")
    narrow = _run(session_reports, "mech-missing-peer", *args, "--set", "sim.payload_width=16")
    for r in (full, narrow):
        assert r.rc == 1
    vf, vn = full.report["analysis"]["verdict"], narrow.report["analysis"]["verdict"]
    assert (vf["cls"], vf["spinning"], vf["idle"], vf["call"]) == (vn["cls"], vn["spinning"], vn["idle"], vn["call"])
    assert full.report["payload_width"] == 4096 and narrow.report["payload_width"] == 16
    assert "payload scaled" not in full.markdown and "payload scaled" in narrow.markdown


def test_twoshot_divergence_finishes_with_wrong_data_and_is_called_corruption(session_reports: Path) -> None:
    r = _run(session_reports, "mech-twoshot-divergence")
    assert r.rc == 1, r.markdown[:2000]
    a = r.report["analysis"]
    assert a["verdict"]["cls"] == "corruption"
    assert r.report["watchdog"]["cls"] in ("clean", "slow")
    wrong = {c["rank"]: c for c in a["corruption"]}
    assert set(wrong) == {0, 1}
    first = wrong[0]["first"]
    assert (first["phase"], first["size"], first["layer"]) == ("capture", 16, 1)
    assert a["verdict"]["top_hypothesis"] == "launch-divergence"
    assert "corruption" in r.markdown.splitlines()[0]
