"""Start, stop and kill `vdisk serve` (python -m vdisk), and clear mounts it leaves."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers.commands import vdisk_cmd
from tests.helpers.daemon import StartError, launch, log_tail, stop
from vdisk.service.mounts import force_unmount, is_mounted  # noqa: F401 (re-exported)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0

__all__ = ["StartError", "Served", "force_unmount", "is_mounted"]


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
        self.proc = launch(
            vdisk_cmd("serve", "--mount", mount, "--qmp", qmp, "--drive", drive, *extra),
            qmp_path=qmp, log_path=log, append=True, cwd=ROOT, new_session=True,
            timeout=START_TIMEOUT)

    @property
    def drive(self) -> Path:
        return self.mount / "d0"

    def tail(self, lines: int = 15) -> str:
        return log_tail(self.log, lines=lines)

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
        stop(self.proc, signal.SIGKILL, STOP_TIMEOUT)

    def terminate(self) -> int:
        """SIGTERM and wait; the exit status (-9 if it had to be killed)."""
        return stop(self.proc, signal.SIGTERM, STOP_TIMEOUT)

    def wait(self) -> int:
        """Wait for an exit already asked for (QMP quit); SIGKILL after STOP_TIMEOUT."""
        return stop(self.proc, None, STOP_TIMEOUT)
