"""Start, stop and kill `vdisk serve` (python -m vdisk), and clear mounts it leaves."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from control.client import qmp_listening
from vdisk.service.mounts import force_unmount, is_mounted  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class StartError(Exception):
    pass


class Served:
    """One `vdisk serve` process serving drive d0."""

    def __init__(self, top: Path, mount: Path, qmp: Path, log: Path, *, copy_on_read: bool,
                 engine_threads: bool = False) -> None:
        self.mount = mount
        self.qmp = qmp
        self.log = log
        drive = f"id=d0,file={top},copy-on-read={'on' if copy_on_read else 'off'}"
        extra = ["--engine-threads"] if engine_threads else []
        self.log_start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as f:
            f.write(f"--- serve {drive} {' '.join(extra)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vdisk", "serve", "--mount", str(mount), "--qmp", str(qmp),
                 "--drive", drive, *extra], cwd=ROOT, stdout=f, stderr=f, stdin=subprocess.DEVNULL,
                start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not qmp_listening(qmp):
                if self.proc.poll() is not None:
                    raise StartError(
                        f"vdisk serve exited with {self.proc.returncode}: {self.tail()}")
                if time.monotonic() > deadline:
                    raise StartError(
                        f"vdisk serve did not start in {START_TIMEOUT}s: {self.tail()}")
                time.sleep(0.02)
        except BaseException:  # also Ctrl-C: never leave the daemon behind
            self.kill()
            raise

    @property
    def drive(self) -> Path:
        return self.mount / "d0"

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def errors(self) -> list[str]:
        """ERROR/CRITICAL lines and tracebacks this daemon logged."""
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            text = f.read().decode(errors="replace")
        return [ln for ln in text.splitlines()
                if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)

    def terminate(self) -> int:
        """SIGTERM and wait; the exit status (-9 if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
