"""The environment a run happened in: versions, driver, GPUs, topology, relevant variables.

Versions come from package metadata (and source files read as text) so that collecting them never
imports torch, vLLM or FlashInfer into vdiag. Every variable value and the command line pass through
`repro.redact`. `collect_env` never raises: what it cannot learn it says in the field instead.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import repro
from repro.records import EnvInfo
from repro.redact import is_secret_name, redact_argv, redact_env, redact_text
from repro.rundir import RunDir
from repro.tools import ToolMissing, ToolTimeout, run_tool, which

log = logging.getLogger(__name__)

VARIABLE_PREFIXES = ("NCCL_", "VLLM_", "TORCH_", "PYTORCH_", "FLASHINFER_", "CUDA_", "OMP_")

# name shown -> distribution names to try, in order
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "vllm": ("vllm",),
    "flashinfer": ("flashinfer-python", "flashinfer"),
    "numpy": ("numpy",),
    "nvidia-ml-py": ("nvidia-ml-py",),
    "py-spy": ("py-spy",),
}

_ASSIGN = r"""^\s*(?:{names})\s*(?::\s*[\w\[\], |]+)?\s*=\s*(?:\w+\s*=\s*)*['"](?P<v>[^'"]+)['"]"""


def _dist_version(names: tuple[str, ...]) -> tuple[str, md.Distribution | None]:
    for n in names:
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            continue
        return dist.version, dist
    return "", None


def _module_dir(module: str) -> Path | None:
    """The package's directory, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        return Path(loc)
    return None


def _read_assignment(path: Path, *names: str) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    m = re.search(_ASSIGN.format(names="|".join(re.escape(n) for n in names)), text, re.MULTILINE)
    return m["v"] if m else ""


def _direct_url_commit(dist: md.Distribution | None) -> str:
    if dist is None:
        return ""
    try:
        raw = dist.read_text("direct_url.json")
        if not raw:
            return ""
        commit = json.loads(raw).get("vcs_info", {}).get("commit_id", "")
        return str(commit)
    except (OSError, ValueError, AttributeError):
        return ""


def _git_describe(path: Path, timeout: float) -> str:
    if which("git") is None:
        return ""
    try:
        res = run_tool(["git", "-C", str(path), "describe", "--always", "--dirty", "--tags"], timeout=timeout)
    except (ToolMissing, ToolTimeout, OSError):
        return ""
    except Exception:
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _versions(timeout: float) -> dict[str, str]:
    out: dict[str, str] = {"vdiag": repro.__version__}
    repo = Path(repro.__file__).resolve().parent.parent
    if (repo / ".git").exists():
        g = _git_describe(repo, timeout)
        if g:
            out["vdiag.git"] = g
    for shown, names in _DISTRIBUTIONS.items():
        extra: dict[str, str] = {}
        try:
            version, dist = _dist_version(names)
            pkg = _module_dir(shown.replace("-", "_") if shown != "nvidia-ml-py" else "pynvml")
            if shown == "torch" and pkg is not None:
                cuda = _read_assignment(pkg / "version.py", "cuda")
                if cuda:
                    extra["torch.cuda"] = cuda
                git = _read_assignment(pkg / "version.py", "git_version")
                if git:
                    extra["torch.git"] = git
            if shown == "vllm" and pkg is not None:
                version = version or _read_assignment(pkg / "_version.py", "__version__", "version")
                commit = _direct_url_commit(dist) or _read_assignment(
                    pkg / "_version.py", "__commit__", "__commit_id__", "commit_id"
                )
                if commit:
                    extra["vllm.commit"] = commit
            if shown == "flashinfer" and pkg is not None and not version:
                version = _read_assignment(pkg / "version.py", "__version__") or _read_assignment(
                    pkg / "_build_meta.py", "__version__"
                )
                if not version:
                    version = _import_version("flashinfer", timeout)
            if version:
                out[shown] = version
            out.update(extra)
        except Exception as e:  # never raise
            log.debug("version of %s: %s", shown, e)
    return out


def _import_version(module: str, timeout: float) -> str:
    """`module.__version__` read in a child interpreter (heavy imports stay out of vdiag)."""
    try:
        res = run_tool(
            [sys.executable, "-c", f"import {module}; print(getattr({module}, '__version__', ''))"],
            timeout=timeout,
        )
    except Exception:
        return ""
    return res.stdout.strip().splitlines()[-1] if res.returncode == 0 and res.stdout.strip() else ""


def _nvml() -> tuple[str, list[str]]:
    try:
        import pynvml
    except ImportError:
        return "no NVML (nvidia-ml-py is not installed)", []
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return f"no NVML ({e})", []
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        driver = drv.decode() if isinstance(drv, bytes) else str(drv)
        try:
            cv = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
            driver += f" (CUDA {cv // 1000}.{cv % 1000 // 10})"
        except Exception:
            pass
        gpus: list[str] = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append(f"{i}: {name.decode() if isinstance(name, bytes) else name}")
        return driver, gpus
    except Exception as e:
        return f"NVML error ({e})", []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _topology(timeout: float) -> str:
    if which("nvidia-smi") is None:
        return ""
    try:
        res = run_tool(["nvidia-smi", "topo", "-m"], timeout=timeout)
    except Exception as e:
        return f"nvidia-smi topo -m failed: {e}"
    if res.returncode != 0:
        return f"nvidia-smi topo -m failed (exit {res.returncode}): {res.output.strip()[-500:]}"
    return res.stdout.rstrip()


def relevant_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """NCCL_/VLLM_/TORCH_/PYTORCH_/FLASHINFER_/CUDA_/OMP_ variables plus any secret-looking ones, redacted."""
    env = os.environ if environ is None else environ
    picked = {k: v for k, v in env.items() if k.startswith(VARIABLE_PREFIXES) or is_secret_name(k)}
    return dict(sorted(redact_env(picked).items()))


def collect_env(run_dir: RunDir, scenario_yaml: str, *, timeout: float = 10.0) -> EnvInfo:
    """Collect the environment, write it to run_dir/env.json, and return it. Never raises.

    `scenario_yaml` is the scenario's text; when run_dir/scenario.yaml does not exist yet it is written
    there (redacted), so that a run folder always says what was replayed.
    """
    fields: dict[str, object] = {}
    try:
        fields["python"] = sys.version.split()[0] + f" ({platform.python_implementation()}, {sys.executable})"
        fields["platform"] = platform.platform()
    except Exception as e:
        log.debug("platform: %s", e)
    try:
        fields["versions"] = _versions(timeout)
    except Exception as e:
        log.debug("versions: %s", e)
    try:
        driver, gpus = _nvml()
        fields["driver"], fields["gpus"] = driver, gpus
    except Exception as e:
        fields["driver"] = f"no NVML ({e})"
    try:
        fields["topology"] = redact_text(_topology(timeout))
    except Exception as e:
        log.debug("topology: %s", e)
    try:
        fields["variables"] = relevant_variables()
    except Exception as e:
        log.debug("variables: %s", e)
    try:
        fields["command_line"] = " ".join(redact_argv(sys.argv))
    except Exception as e:
        log.debug("command line: %s", e)
    try:
        info = EnvInfo.model_validate(fields)
    except Exception as e:
        log.warning("environment record: %s", e)
        info = EnvInfo()
    try:
        run_dir.env_json.parent.mkdir(parents=True, exist_ok=True)
        run_dir.env_json.write_text(info.model_dump_json(indent=2))
    except OSError as e:
        log.warning("could not write %s: %s", run_dir.env_json, e)
    try:
        if scenario_yaml and not run_dir.scenario_yaml.exists():
            run_dir.scenario_yaml.write_text(redact_text(scenario_yaml))
    except OSError as e:
        log.warning("could not write %s: %s", run_dir.scenario_yaml, e)
    return info
