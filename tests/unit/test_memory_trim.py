"""vdisk.service.memory: the heap that start-up freed goes back to the kernel."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT


def test_release_unused_returns_freed_heap() -> None:
    code = textwrap.dedent("""
        from vdisk.service.memory import release_unused, _rss
        blocks = [bytes(2000) + bytes([i % 256]) for i in range(40000)]  # ~80 MiB of malloc
        keep = blocks[-1]
        del blocks
        before = _rss()
        freed = release_unused()
        print(freed, before - _rss(), len(keep))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    freed, dropped, _ = map(int, res.stdout.split())
    assert freed >= 32 << 20, res.stdout
    assert dropped >= 32 << 20
