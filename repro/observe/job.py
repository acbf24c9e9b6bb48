"""The command `vdiag watch` runs: its own session and process group, output passed through and scanned.

On a terminal the command gets a pseudo-terminal (so colours and tqdm bars look as they do without
vdiag) and vdiag's stdin is forwarded to it; otherwise stdout and stderr are pipes copied to vdiag's own.
Everything the job prints is also fed to the progress scanner and appended, redacted, to
``logs/output.log`` in the run folder. `end()` stops the whole tree, including children that left the
process group.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil

from repro.errors import EnvironmentProblem, ScenarioError
from repro.observe.progress import ProgressScanner
from repro.redact import redact_text
from repro.torchrun import _pdeathsig

END_GRACE_S = 5.0


class Job:
    def __init__(self, argv: list[str], log_path: Path, scanner: ProgressScanner,
                 env: dict[str, str] | None = None, *, use_pty: bool | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.scanner = scanner
        self.env = env
        self.use_pty = sys.stdout.isatty() if use_pty is None else use_pty
        self.proc: subprocess.Popen[bytes] | None = None
        self._threads: list[threading.Thread] = []
        self._log: IO[str] | None = None
        self._lock = threading.Lock()
        self._master: int | None = None
        self.known: dict[int, psutil.Process] = {}  # every descendant ever seen, for end()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        env = {**os.environ, **(self.env or {})}
        try:
            if self.use_pty:
                import pty

                master, slave = pty.openpty()
                with contextlib.suppress(Exception):
                    import fcntl
                    import termios

                    size = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
                    fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
                self.proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                             start_new_session=True, preexec_fn=_pdeathsig)
                os.close(slave)
                self._master = master
                self._spawn(self._pump_fd, master, sys.stdout)
                if sys.stdin.isatty():
                    self._spawn(self._forward_stdin, master)
            else:
                self.proc = subprocess.Popen(self.argv, stdin=None, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=env, start_new_session=True,
                                             preexec_fn=_pdeathsig)
                assert self.proc.stdout is not None and self.proc.stderr is not None
                self._spawn(self._pump_fd, self.proc.stdout.fileno(), sys.stdout)
                self._spawn(self._pump_fd, self.proc.stderr.fileno(), sys.stderr)
        except FileNotFoundError:
            raise ScenarioError(f"vdiag watch: {self.argv[0]!r}: command not found; give the program to run "
                                "after `--`, e.g. vdiag watch -- torchrun --nproc-per-node 2 job.py") from None
        except PermissionError:
            raise EnvironmentProblem(f"vdiag watch: {self.argv[0]!r}: permission denied (not executable); "
                                     f"chmod +x it or run it through its interpreter") from None

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _pump_fd(self, fd: int, out: IO[str]) -> None:
        buf = getattr(out, "buffer", None)
        pending = ""  # the log gets whole lines, so that redaction never sees half a secret
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the pty's last writer closed
                break
            if not data:
                break
            with contextlib.suppress(Exception):
                if buf is not None:
                    buf.write(data)
                    buf.flush()
                else:
                    out.write(data.decode(errors="replace"))
                    out.flush()
            text = data.decode(errors="replace")
            self.scanner.feed(text)
            pending += text
            cut = max(pending.rfind("\n"), pending.rfind("\r"))
            if cut >= 0 or len(pending) > 1 << 20:
                whole, pending = (pending[: cut + 1], pending[cut + 1:]) if cut >= 0 else (pending, "")
                self._write_log(whole)
        self._write_log(pending)

    def _write_log(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            if self._log is not None:
                self._log.write(redact_text(text))
                self._log.flush()

    def _forward_stdin(self, master: int) -> None:
        sel = selectors.DefaultSelector()
        with contextlib.suppress(Exception):
            sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
            while self.returncode() is None:
                if sel.select(timeout=0.5):
                    data = os.read(sys.stdin.fileno(), 4096)
                    if not data:
                        break
                    os.write(master, data)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def remember(self, procs: list[psutil.Process]) -> None:
        for p in procs:
            self.known.setdefault(p.pid, p)

    def end(self) -> None:
        """SIGTERM the process group and every descendant seen, SIGKILL what is left after a grace."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            self.remember(psutil.Process(self.proc.pid).children(recursive=True))
        procs = [p for p in self.known.values() if _same(p)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=END_GRACE_S if sig == signal.SIGTERM else 5)
            _, alive = psutil.wait_procs(procs, timeout=END_GRACE_S if sig == signal.SIGTERM else 5)
            procs = alive
            if not procs and self.proc.poll() is not None:
                break
        self.close()

    def wait_output(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.wait_output(2.0)
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = None


def _same(p: psutil.Process) -> bool:
    """Whether a remembered process is still the one seen (pids are reused)."""
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        return p.is_running()
    return False
