"""`vdiag bisect` against real git repositories and a real (local) package index, with real torchrun workers.

The repositories hold a small package, `toyvllm`, that the scenario loads through its documented hook
(`hook: "toyvllm.hook:configure"`): its functions decide the fusion gate, the workspace group and the
one-shot/two-shot protocol of each rank. One commit (the culprit) makes the protocol depend on a
rank-local value, so the TP peers disagree (one one-shot, one two-shot) and both spin: a real hang of the
sim's protocols, not a planted one. Each test asserts what the user sees: the commit named, the exit
code, the log, and the repository exactly as it was.

Runtime: each real run of the tiny scenario (TP 2, 2 layers, 2 capture sizes) takes 7-12 s on two
cores; each test below uses at most 8.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from repro.bisect import VersionSearch

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = """\
name: toy-bisect
model: {preset: llama-3.1-70b, num_layers: 2}
parallel: {tp: 2, pp: 1}
capture: {sizes: [8, 4]}
fusion: {allreduce_rms: "on", oneshot: vllm, workspace_group: tp}
backend: sim
hook: "%s"
"""

HOOK = '''\
"""vdiag's scenario hook: the fusion settings this version of toyvllm would use on `rank`."""
from toyvllm.fusion import fusion_gate, oneshot_policy, workspace_group


def configure(scenario, rank):
    p = scenario["parallel"]
    return {
        "fusion.allreduce_rms": fusion_gate(p["tp"], p["pp"]),
        "fusion.workspace_group": workspace_group(p["tp"], p["pp"]),
        "fusion.oneshot": oneshot_policy(rank),
    }
'''

FUSION_GOOD = '''\
def fusion_gate(tp, pp):
    return "on" if tp > 1 and pp == 1 else "off"


def workspace_group(tp, pp):
    return "tp"


def oneshot_policy(rank):
    # every TP peer must take the same decision: it only depends on shared facts
    return "vllm"
'''

# The culprit: the one-shot decision reads a rank-local fact (the local GPU's SM count), so on a node
# with mixed GPUs the two TP peers choose different protocols.
FUSION_CULPRIT = FUSION_GOOD.replace('''def oneshot_policy(rank):
    # every TP peer must take the same decision: it only depends on shared facts
    return "vllm"
''', '''LOCAL_SM_COUNT = {0: 132, 1: 114}


def oneshot_policy(rank):
    # one-shot only where the local GPU has enough SMs for the Lamport kernel
    return "always" if LOCAL_SM_COUNT.get(rank, 132) >= 132 else "never"
''')

# The flaky culprit: the same mistake, but the local fact only differs now and then. Rank 1 counts the
# runs it has seen (in $TOY_FLAKY_STATE) and disagrees on every second one, so the outcome of a test is
# fixed while vdiag still has to run a step more than once to see the hang.
FUSION_FLAKY = FUSION_GOOD.replace('''def oneshot_policy(rank):
    # every TP peer must take the same decision: it only depends on shared facts
    return "vllm"
''', '''import os


def _local_sm_count(rank):
    # reads the device's current SM budget (MPS/MIG partitions can change it between start-ups)
    if rank != 1:
        return 132
    path = os.environ["TOY_FLAKY_STATE"]
    with open(path, "a+") as f:
        f.write(os.environ.get("VDIAG_RUN_TOKEN", "?") + "\\n")
        f.seek(0)
        seen = len(f.read().split())
    return 114 if seen % 2 == 0 else 132


def oneshot_policy(rank):
    return "always" if _local_sm_count(rank) >= 132 else "never"
''')

BINARY_CHECK = '''\
from pathlib import Path

if not (Path(__file__).parent / "_C.abi3.so").exists():
    raise ImportError("toyvllm._C is missing: build toyvllm or install precompiled binaries")
'''


# ---- helpers ---------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="Toy Dev", GIT_AUTHOR_EMAIL="dev@toy.invalid",
               GIT_COMMITTER_NAME="Toy Dev", GIT_COMMITTER_EMAIL="dev@toy.invalid", LC_ALL="C")
    p = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env, check=True)
    return p.stdout.strip()


@dataclass
class ToyRepo:
    path: Path
    commits: list[str]  # oldest first
    subjects: list[str]

    def state(self) -> dict[str, str]:
        return {
            "head": _git(self.path, "rev-parse", "HEAD"),
            "branch": _git(self.path, "symbolic-ref", "HEAD"),
            "worktrees": _git(self.path, "worktree", "list", "--porcelain"),
            "status": _git(self.path, "status", "--porcelain", "--ignored"),
        }

    def assert_restored(self, before: dict[str, str]) -> None:
        assert self.state() == before
        bl = subprocess.run(["git", "bisect", "log"], cwd=self.path, capture_output=True, text=True)
        assert bl.returncode != 0, "the repository is still bisecting"
        git_dir = Path(_git(self.path, "rev-parse", "--absolute-git-dir"))
        assert not (git_dir / "BISECT_LOG").exists()
        assert not (git_dir / "worktrees").exists() or not any((git_dir / "worktrees").iterdir())


def make_repo(path: Path, history: list[tuple[str, dict[str, str | None]]]) -> ToyRepo:
    """A git repository with one commit per (subject, {file: content or None to delete})."""
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    commits, subjects = [], []
    for subject, files in history:
        for rel, content in files.items():
            f = path / rel
            if content is None:
                f.unlink()
                continue
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(content)
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", subject)
        commits.append(_git(path, "rev-parse", "HEAD"))
        subjects.append(subject)
    return ToyRepo(path, commits, subjects)


def base_files(binary_check: bool = False) -> dict[str, str | None]:
    return {
        "toyvllm/__init__.py": BINARY_CHECK if binary_check else "",
        "toyvllm/hook.py": HOOK,
        "toyvllm/fusion.py": FUSION_GOOD,
        ".gitignore": "*.so\n__pycache__/\n",
    }


def vdiag(args: list[str], cwd: Path, env: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("vdiag")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "repro.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def bisect_dir(reports: Path) -> Path:
    dirs = sorted(p for p in reports.iterdir() if p.is_dir() and "-bisect-" in p.name)
    assert len(dirs) == 1, dirs
    return dirs[0]


def scenario_file(tmp: Path, hook: str = "toyvllm.hook:configure") -> Path:
    p = tmp / "toy-bisect.yaml"
    p.write_text(SCENARIO % hook)
    return p


# ---- a deterministic culprit (with --setup and --python-only) -----------------------------------------------


@pytest.fixture(scope="module")
def det_repo(tmp_path_factory: pytest.TempPathFactory) -> ToyRepo:
    root = tmp_path_factory.mktemp("det")
    repo = make_repo(root / "toyvllm", [
        ("toyvllm: fusion settings hook for vdiag", base_files(binary_check=True)),
        ("docs: explain the fusion gate", {"README.md": "The gate: TP > 1 and PP == 1.\n"}),
        ("fusion: name the workspace group explicitly", {"toyvllm/fusion.py": FUSION_GOOD.replace(
            'return "tp"', 'group = "tp"  # never WORLD: PP stages must not share buffers\n    return group')}),
        ("fusion: pick one-shot per rank from the local SM count", {"toyvllm/fusion.py": FUSION_CULPRIT.replace(
            'return "tp"', 'group = "tp"  # never WORLD: PP stages must not share buffers\n    return group')}),
        ("release 0.2.0", {"VERSION": "0.2.0\n"}),
    ])
    # the prebuilt binary a VLLM_USE_PRECOMPILED install leaves in the checkout (ignored by git)
    (repo.path / "toyvllm" / "_C.abi3.so").write_bytes(b"\x7fELF not really")
    # an uncommitted change of the user's: bisect must not touch it
    (repo.path / "NOTES.txt").write_text("my local notes\n")
    return repo


# a "build" that also leaves tracked and untracked files changed, as real builds do
SETUP = "python -m compileall -q toyvllm && echo '# built' >> toyvllm/hook.py && echo built > BUILD-STAMP"


@pytest.mark.slow
def test_bisect_names_the_deterministic_culprit_and_restores_the_repo(det_repo: ToyRepo, tmp_path: Path) -> None:
    before = det_repo.state()
    reports = tmp_path / "reports"
    p = vdiag(["bisect", str(scenario_file(tmp_path)), "--repo", str(det_repo.path), "--good", det_repo.commits[0],
               "--bad", "main", "--python-only", "--setup", SETUP,
               "--search", "rule", "--min-rate", "1", "--reports", str(reports), "--gpu-state", "none"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    culprit = det_repo.commits[3]
    out = p.stdout.splitlines()
    assert out[0] == f"first bad commit: {culprit} fusion: pick one-shot per rank from the local SM count"
    assert "toyvllm/fusion.py | " in p.stdout and "1 file changed" in p.stdout  # the diff stat
    det_repo.assert_restored(before)

    log_dir = bisect_dir(reports)
    assert out[-1] == f"bisect log: {log_dir / 'bisect.md'}"
    data = json.loads((log_dir / "bisect.json").read_text())
    assert data["status"] == "found" and data["first_bad"] == culprit and data["exit_code"] == 0
    steps = data["steps"]
    assert [s["role"] for s in steps[:2]] == ["good end", "bad end"]
    assert [s["verdict"] for s in steps[:2]] == ["good", "bad"]
    for s in steps:
        assert s["rev"] in det_repo.commits and s["runs"] and s["seconds"] > 0 and s["setup_log"]
        assert Path(s["runs"][-1]["report_md"]).is_file()
        assert s["verdict"] == ("bad" if det_repo.commits.index(s["rev"]) >= 3 else "good")
    assert len([r for s in steps for r in s["runs"]]) <= 5
    # the hang is the peers' protocol mismatch, as the step's report says
    bad_report = json.loads(Path(steps[1]["runs"][0]["report_md"]).with_name("report.json").read_text())
    assert bad_report["analysis"]["hypotheses"][0]["key"] == "protocol-mismatch"
    md = (log_dir / "bisect.md").read_text()
    assert f"**first bad commit: {culprit} fusion: pick one-shot per rank" in md
    for s in steps:
        assert f"`{s['rev'][:10]} " in md
    assert "[report](runs/" in md
    assert "1 prebuilt binary linked" in md
    git_log = (log_dir / "git-bisect.log").read_text()
    assert f"# first bad commit: [{culprit}]" in git_log


def test_bisect_refuses_good_and_bad_the_wrong_way_round(det_repo: ToyRepo, tmp_path: Path) -> None:
    before = det_repo.state()
    sc = scenario_file(tmp_path)
    # by ancestry: no run needed
    p = vdiag(["bisect", str(sc), "--repo", str(det_repo.path), "--good", "main", "--bad", det_repo.commits[0],
               "--reports", str(tmp_path / "r1")], tmp_path)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vdiag: error: --bad ")
    assert "wrong way round" in err[0]
    assert not (tmp_path / "r1").exists() or not any((tmp_path / "r1").iterdir())
    # by behaviour: --good already hangs
    p = vdiag(["bisect", str(sc), "--repo", str(det_repo.path), "--good", det_repo.commits[3], "--bad", "main",
               "--python-only", "--search", "rule", "--min-rate", "1", "--reports", str(tmp_path / "r2"), "--gpu-state", "none"], tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("vdiag: error:")]
    assert len(err) == 1 and err[0].startswith(f"vdiag: error: --good {det_repo.commits[3][:10]} ")
    assert "reproduces the failure" in err[0] and "wrong way round" in err[0]
    data = json.loads((bisect_dir(tmp_path / "r2") / "bisect.json").read_text())
    assert data["status"] == "error" and len(data["steps"]) == 1
    det_repo.assert_restored(before)


def test_bisect_checks_scenario_and_revisions_before_any_step(det_repo: ToyRepo, tmp_path: Path) -> None:
    bad_sc = tmp_path / "bad.yaml"
    bad_sc.write_text("name: x\nmodel: {preset: llama-3.1-70b}\nparallel: {tp: 3}\n")
    p = vdiag(["bisect", str(bad_sc), "--repo", str(det_repo.path), "--good", "main~4", "--bad", "main"], tmp_path)
    assert p.returncode == 2 and "parallel" in p.stderr
    p = vdiag(["bisect", str(scenario_file(tmp_path)), "--repo", str(det_repo.path), "--good", "nosuchrev",
               "--bad", "main"], tmp_path)
    assert p.returncode == 2 and "--good nosuchrev: no such commit" in p.stderr
    p = vdiag(["bisect", str(scenario_file(tmp_path)), "--repo", str(det_repo.path), "--good", "main~4",
               "--bad", "main", "--confidence", "0.99", "--search", "rule", "--min-rate", "0.1"], tmp_path)
    assert p.returncode == 2 and "needs 44 clean runs per good step, more than --max-runs 10" in p.stderr


def test_bisect_interrupted_restores_the_repo(det_repo: ToyRepo, tmp_path: Path) -> None:
    before = det_repo.state()
    reports = tmp_path / "reports"
    exe = Path(sys.executable).with_name("vdiag")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "repro.cli"]
    proc = subprocess.Popen(
        [*cmd, "bisect", str(scenario_file(tmp_path)), "--repo", str(det_repo.path), "--good", det_repo.commits[0],
         "--bad", "main", "--python-only", "--search", "rule", "--min-rate", "1", "--reports", str(reports)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the first run's workers have started
            runs = list(reports.glob("*-bisect-*/runs/*/launch/rank1.jsonl"))
            if runs and runs[0].stat().st_size > 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the first step never started")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    det_repo.assert_restored(before)
    data = json.loads((bisect_dir(reports) / "bisect.json").read_text())
    assert data["status"] == "interrupted"


# ---- a skipped commit in between -------------------------------------------------------------------------


@pytest.mark.slow
def test_bisect_skips_a_commit_that_cannot_import(tmp_path: Path) -> None:
    files = base_files()
    repo = make_repo(tmp_path / "toyvllm", [
        ("toyvllm: fusion settings hook for vdiag", files),
        ("docs: explain the fusion gate", {"README.md": "The gate: TP > 1 and PP == 1.\n"}),
        ("refactor: split the fusion policies", {  # forgot to rename the import: ImportError
            "toyvllm/policies.py": FUSION_GOOD, "toyvllm/fusion.py": None,
        }),
        ("fix: import the renamed module", {"toyvllm/hook.py": HOOK.replace("toyvllm.fusion", "toyvllm.policies")}),
        ("policies: pick one-shot per rank from the local SM count", {"toyvllm/policies.py": FUSION_CULPRIT}),
        ("release 0.2.0", {"VERSION": "0.2.0\n"}),
    ])
    before = repo.state()
    reports = tmp_path / "reports"
    p = vdiag(["bisect", str(scenario_file(tmp_path)), "--repo", str(repo.path), "--good", repo.commits[0],
               "--bad", repo.commits[-1], "--search", "rule", "--min-rate", "1", "--reports", str(reports), "--gpu-state", "none"],
              tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0] == (
        f"first bad commit: {repo.commits[4]} policies: pick one-shot per rank from the local SM count")
    repo.assert_restored(before)
    data = json.loads((bisect_dir(reports) / "bisect.json").read_text())
    skipped = [s for s in data["steps"] if s["verdict"] == "skip"]
    assert [s["rev"] for s in skipped] == [repo.commits[2]]
    assert "exit 4" in skipped[0]["reason"]  # the run crashed: the hook could not be imported
    rep = json.loads(Path(skipped[0]["runs"][0]["report_md"]).with_name("report.json").read_text())
    assert rep["watchdog"]["cls"] == "crash"
    assert f"git bisect skip {repo.commits[2]}" in (bisect_dir(reports) / "git-bisect.log").read_text()


# ---- a flaky culprit ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flaky_repo(tmp_path_factory: pytest.TempPathFactory) -> ToyRepo:
    root = tmp_path_factory.mktemp("flaky")
    return make_repo(root / "toyvllm", [
        ("toyvllm: fusion settings hook for vdiag", base_files()),
        ("docs: explain the fusion gate", {"README.md": "The gate: TP > 1 and PP == 1.\n"}),
        ("fusion: follow the device's current SM budget for one-shot", {"toyvllm/fusion.py": FUSION_FLAKY}),
        ("release 0.2.0", {"VERSION": "0.2.0\n"}),
    ])


@pytest.mark.slow
def test_bisect_reruns_steps_so_a_flaky_culprit_is_not_labelled_good(flaky_repo: ToyRepo, tmp_path: Path) -> None:
    before = flaky_repo.state()
    reports = tmp_path / "reports"
    state = tmp_path / "flaky-state"
    # a hang seen in half the runs must be ruled out with 75 % confidence: two clean runs per good step
    p = vdiag(["bisect", str(scenario_file(tmp_path)), "--repo", str(flaky_repo.path), "--good",
               flaky_repo.commits[0], "--bad", "main", "--search", "rule", "--min-rate", "0.5", "--confidence", "0.75",
               "--reports", str(reports), "--gpu-state", "none"], tmp_path, env={"TOY_FLAKY_STATE": str(state)})
    assert p.returncode == 0, p.stdout + p.stderr
    culprit = flaky_repo.commits[2]
    assert p.stdout.splitlines()[0] == (
        f"first bad commit: {culprit} fusion: follow the device's current SM budget for one-shot")
    flaky_repo.assert_restored(before)
    data = json.loads((bisect_dir(reports) / "bisect.json").read_text())
    assert data["policy"]["clean_runs_for_good"] == 2
    for s in data["steps"]:
        shorts = [r["exit_code"] for r in s["runs"]]
        if s["verdict"] == "good":
            assert shorts == [0, 0], s  # never good on one clean run
        else:
            assert s["verdict"] == "bad" and shorts[-1] == 1 and set(shorts[:-1]) <= {0}
    # the culprit's first run was clean: one run per step would have labelled it good
    culprit_step = next(s for s in data["steps"] if s["rev"] == culprit)
    assert [r["exit_code"] for r in culprit_step["runs"]] == [0, 1]
    assert sum(len(s["runs"]) for s in data["steps"]) <= 8


def test_run_repeat_reports_the_hang_rate_with_an_interval(flaky_repo: ToyRepo, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(flaky_repo.path), str(checkout)], check=True)
    path = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": path, "TOY_FLAKY_STATE": str(tmp_path / "state")}
    p = vdiag(["run", str(scenario_file(tmp_path)), "--repeat", "2", "--reports", str(tmp_path / "reports"),
               "--gpu-state", "none", "--no-live"], tmp_path, env=env)
    assert p.returncode == 1, p.stdout + p.stderr  # one run hung
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and all(Path(x).name == "report.md" and Path(x).is_file() for x in lines[:2])
    assert lines[2] == "hang in 1 of 2 runs: rate 50%, 95% interval 9%-91% (Wilson score)"
    assert "run 1/2: clean" in p.stderr and "run 2/2: hang" in p.stderr


# ---- package versions -------------------------------------------------------------------------------------


def _wheel(dist: Path, version: str, module_text: str) -> None:
    name = "vdiag_toyfi"
    files = {
        f"{name}/__init__.py": module_text.encode(),
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: vdiag-toyfi\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: vdiag-tests\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}")
    lines.append(f"{record},,")
    with zipfile.ZipFile(dist / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(record, "\n".join(lines) + "\n")


TOYFI = '''\
"""A stand-in for flashinfer-python {version}: how its all-reduce fusion sets up on each rank."""
__version__ = "{version}"


def configure(scenario, rank):
    tp = scenario["parallel"]["tp"]
    return {{"fusion.workspace_group": "tp", "fusion.oneshot": {policy}}}
'''


@pytest.mark.slow
def test_bisect_pip_finds_the_first_bad_version(tmp_path: Path) -> None:
    dist = tmp_path / "wheels"
    dist.mkdir()
    versions = ["0.6.8.post1", "0.6.9", "0.6.10", "0.6.11", "0.6.11.post2"]
    for v in [*versions, "0.6.12"]:
        bad = v in ("0.6.11", "0.6.11.post2", "0.6.12")
        policy = '("always" if rank % 2 == 0 else "never")' if bad else '"vllm"'
        _wheel(dist, v, TOYFI.format(version=v, policy=policy))
    sc = scenario_file(tmp_path, hook="vdiag_toyfi:configure")
    cache = tmp_path / "cache"
    reports = tmp_path / "reports"
    index = ["--no-index", "--find-links", str(dist), "--cache-dir", str(cache)]
    p = vdiag(["bisect", str(sc), "--pip", "vdiag-toyfi", "--good", "0.6.8.post1", "--bad", "0.6.11.post2",
               *index, "--search", "rule", "--min-rate", "1", "--reports", str(reports), "--gpu-state", "none"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0] == "first bad version: vdiag-toyfi 0.6.11"
    data = json.loads((bisect_dir(reports) / "bisect.json").read_text())
    assert data["versions"] == versions  # the index's list, ordered, cut to [good, bad]
    assert data["last_good"] == "vdiag-toyfi 0.6.10"
    tested = [s["rev"] for s in data["steps"]]
    assert tested[:2] == ["0.6.8.post1", "0.6.11.post2"] and len(tested) <= 4
    for v in tested:
        env = cache / "envs" / f"vdiag-toyfi-{v}-py{sys.version_info.major}{sys.version_info.minor}"
        assert (env / "vdiag_toyfi" / "__init__.py").read_text().count(f'"{v}"') == 1
        assert (env / ".vdiag-env.json").is_file()
    # wrong way round: a clear error before any install or run
    p = vdiag(["bisect", str(sc), "--pip", "vdiag-toyfi", "--good", "0.6.11", "--bad", "0.6.9", *index,
               "--reports", str(tmp_path / "r2")], tmp_path)
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1] == ("vdiag: error: --good 0.6.11 is newer than --bad 0.6.9: --good and --bad are the "
                                "wrong way round; --good is the older version that starts cleanly, --bad the newer "
                                "one that hangs")
    p = vdiag(["bisect", str(sc), "--pip", "vdiag-toyfi", "--good", "0.6.7", "--bad", "0.6.9", *index], tmp_path)
    assert p.returncode == 2 and "--good 0.6.7: the index has no such version of vdiag-toyfi" in p.stderr


def test_bisect_pip_bayes_search_shows_the_posterior_after_every_run(tmp_path: Path) -> None:
    dist = tmp_path / "wheels"
    dist.mkdir()
    versions = ["0.6.8.post1", "0.6.9", "0.6.10", "0.6.11", "0.6.11.post2"]
    for v in versions:
        bad = v in ("0.6.11", "0.6.11.post2")
        policy = '("always" if rank % 2 == 0 else "never")' if bad else '"vllm"'
        _wheel(dist, v, TOYFI.format(version=v, policy=policy))
    sc = scenario_file(tmp_path, hook="vdiag_toyfi:configure")
    reports = tmp_path / "reports"
    index = ["--no-index", "--find-links", str(dist), "--cache-dir", str(tmp_path / "cache")]
    # a deterministic hang, said so: the search is a binary search whose log carries the posterior
    p = vdiag(["bisect", str(sc), "--pip", "vdiag-toyfi", "--good", "0.6.8.post1", "--bad", "0.6.11.post2", *index,
               "--search", "bayes", "--repro-rate", "1", "--false-fail-rate", "0", "--confidence", "0.99",
               "--reports", str(reports), "--gpu-state", "none"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0] == "first bad version: vdiag-toyfi 0.6.11"
    data = json.loads((bisect_dir(reports) / "bisect.json").read_text())
    assert data["search"] == "bayes" and data["last_good"] == "vdiag-toyfi 0.6.10"
    steps = data["steps"]
    assert [s["rev"] for s in steps[:2]] == ["0.6.8.post1", "0.6.11.post2"] and len(steps) <= 4
    assert all(len(s["runs"]) == 1 for s in steps)  # one run each: a reproduction rate of 1 needs no repeat
    assert dict(steps[-1]["posterior"])["vdiag-toyfi 0.6.11"] == 1.0
    assert "posterior of the first bad item: 1.000" in " ".join(data["notes"])
    assert p.stderr.count("  posterior: ") == len(steps) - 1  # after the bad end and after every step


# ---- the search itself (no runs) --------------------------------------------------------------------------


@pytest.mark.parametrize("n,first_bad,skips", [
    (2, 1, set()), (5, 3, set()), (9, 1, set()), (9, 8, {4, 5}), (16, 7, {6}), (16, 7, {7}),
])
def test_version_search_finds_the_first_bad_index(n: int, first_bad: int, skips: set[int]) -> None:
    s = VersionSearch(n)
    probes = []
    while (i := s.probe()) is not None:
        probes.append(i)
        s.mark(i, "skip" if i in skips else ("bad" if i >= first_bad else "good"))
    assert len(probes) == len(set(probes))
    if first_bad in skips or first_bad - 1 in skips:  # a skip next to the culprit leaves two candidates
        assert s.found() is None
        cands = s.candidates()
        assert first_bad in cands and len(cands) >= 2 and set(cands[:-1]) <= skips
    else:
        assert s.found() == first_bad


def test_cli_help_lists_bisect_and_minimize() -> None:
    p = vdiag(["--help"], ROOT)
    assert "bisect" in p.stdout and "minimize" in p.stdout
    p = vdiag(["bisect", "--help"], ROOT)
    assert "--python-only" in p.stdout and "--confidence" in p.stdout
    assert textwrap.dedent("""\
        Exit codes: 0 first bad commit/version found, 1 inconclusive""").split()[0] in p.stdout
