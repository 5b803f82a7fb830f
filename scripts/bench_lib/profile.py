"""Optional py-spy sampling of the vdisk daemon during one measurement."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


@contextmanager
def sampled(pid: int, out_dir: Path | None, name: str) -> Iterator[None]:
    """Record pid's Python stacks (py-spy raw format) into out_dir/name.txt while inside."""
    exe = py_spy() if out_dir is not None else None
    if exe is None or out_dir is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{name}.txt"
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                             "--nonblocking", "-o", str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if raw.exists():
        (out_dir / f"{name}.top.txt").write_text(summarize(raw))


def _frame(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'file.py:func'."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{short}:{func}"


def summarize(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from a py-spy raw (collapsed) file."""
    self_n: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"samples: {total}", "", "self %  function"]
    for f, n in self_n.most_common(top):
        lines.append(f"{100 * n / max(total, 1):6.1f}  {f}")
    lines += ["", "incl %  function"]
    for f, n in incl.most_common(top * 2):
        lines.append(f"{100 * n / max(total, 1):6.1f}  {f}")
    return "\n".join(lines) + "\n"
