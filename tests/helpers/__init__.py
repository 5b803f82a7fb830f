"""Helpers shared by the test suite and by scripts/ (bench, torture). No tests here.

    commands   run() for any tool; the qemu-img, qemu-io and vdisk command lines
    chains     backing chains made with qemu-img and qemu-io (the oracles)
    locks      QEMU's lock bytes on an image; a qemu-io that holds an image open
    daemon     start a server and wait for its QMP socket (`vdisk serve`, or
               qemu-storage-daemon for the bench); stop it; never leave it behind
    qmp        a QMP session that collects events (qemu.qmp's legacy client)
    faulty_fs  file systems that fail: a FUSE file with an EIO range, a small tmpfs
    leftovers  mounts, loop devices and processes a run may leave behind
    polling    wait_until

The scripts put the repository root on sys.path and import tests.helpers; pytest has it
there through `pythonpath` in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
