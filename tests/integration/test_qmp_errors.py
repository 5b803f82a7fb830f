"""Error answers of the modern command names against qemu-storage-daemon 7.2.

The same calls go to `vdisk serve` and to qsd, each over its own copy of the same drives
(d0: a qcow2 chain, ro: the same chain read-only, r0: a raw image): wrong, missing and
unexpected arguments, every refusal of block-stream in QEMU's order, jobs not found,
refusals on a running job, and requests with duplicate keys. The answers (class and
desc, or the return value) and the events they cause must be equal. The seed's names
keep the seed's classes (checked on vdisk alone: qsd has no such names).
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT
from tests.helpers.chains import MiB, create
from tests.helpers.commands import qemu_io
from tests.helpers.daemon import serving
from tests.helpers.polling import wait_until
from tests.helpers.qmp import QMP, qmp_session
from tests.helpers.qsd import Node, qsd_serving

ENGINE = ("--engine-threads",)  # see tests/integration/test_job_model.py

S = "block-stream"
CALLS: list[tuple[str, dict[str, Any]]] = [
    (S, {}),
    (S, {"device": 5}),
    (S, {"device": "nope", "job-id": "j"}),
    (S, {"device": "nope"}),
    (S, {"device": "d0", "job-id": "j", "speed": "x"}),
    (S, {"device": "d0", "job-id": "j", "speed": 1.5}),
    (S, {"device": "d0", "job-id": "j", "speed": True}),
    (S, {"device": "d0", "job-id": "j", "speed": 2**63}),
    (S, {"device": "d0", "job-id": "j", "speed": -(2**63) - 1}),
    (S, {"device": "d0", "job-id": "j", "speed": -1}),  # created, then null
    (S, {"device": "d0", "job-id": "j", "on-error": "bogus"}),
    (S, {"device": "d0", "job-id": "j", "on-error": 3}),
    (S, {"device": "d0", "job-id": "j", "auto-finalize": 1}),
    (S, {"device": "d0", "job-id": "j", "auto-dismiss": "yes"}),
    (S, {"device": "d0", "job-id": 7}),
    (S, {"device": "d0", "job-id": "j", "bogus": 1}),
    (S, {"device": "d0", "job-id": "j", "base": "other.qcow2"}),
    (S, {"device": "d0", "job-id": "j", "base": "other.qcow2", "backing-file": "x"}),
    (S, {"device": "d0", "job-id": "j", "backing-file": "x"}),
    (S, {"device": "d0", "job-id": "1 bad"}),
    (S, {"device": "ro", "job-id": "j"}),
    (S, {"device": "ro", "job-id": "1 bad"}),
    (S, {"device": "ro", "job-id": "j", "speed": -1}),
    (S, {"device": "ro", "job-id": "j", "backing-file": "x"}),
    (S, {"device": "r0", "job-id": "j", "base": "base.qcow2"}),
    (S, {"device": "d0", "job-id": "j", "base": "base.qcow2", "backing-file": "x",
         "speed": -1}),
    ("block-job-set-speed", {"device": "x", "speed": 1}),
    ("block-job-set-speed", {"device": "x"}),
    ("block-job-set-speed", {"device": "x", "speed": -1}),
    ("block-job-set-speed", {"device": "x", "value": 1}),
    ("block-job-cancel", {"device": "x", "force": 1}),
    ("block-job-cancel", {"device": "x"}),
    ("block-job-pause", {"device": "x"}),
    ("block-job-resume", {"device": "x"}),
    ("block-job-complete", {"device": "x"}),
    ("block-job-finalize", {"id": "x"}),
    ("block-job-finalize", {"device": "x"}),
    ("block-job-dismiss", {"id": "x"}),
    ("job-cancel", {"id": "x"}),
    ("job-cancel", {}),
    ("job-pause", {"id": 1}),
    ("job-resume", {"id": "x"}),
    ("job-complete", {"id": "x"}),
    ("job-finalize", {"id": "x"}),
    ("job-dismiss", {"id": "x", "force": True}),
    ("query-jobs", {"bogus": 1}),
    ("query-block-jobs", {"x": None}),
    ("qmp_capabilities", {}),
    ("no-such-command", {}),
]

# With a job j1 running on d0 (and started on r0 and d0 as no-ops afterwards).
RUNNING: list[tuple[str, dict[str, Any]]] = [
    (S, {"device": "d0", "job-id": "j2"}),
    (S, {"device": "d0", "job-id": "j1"}),
    (S, {"device": "r0", "job-id": "j1"}),
    ("block-job-set-speed", {"device": "j1", "speed": -1}),
    ("block-job-set-speed", {"device": "d0", "speed": 1}),
    ("job-complete", {"id": "j1"}),
    ("block-job-complete", {"device": "j1"}),
    ("job-finalize", {"id": "j1"}),
    ("job-dismiss", {"id": "j1"}),
    ("block-job-resume", {"device": "j1"}),
]

# Raw requests (the qemu.qmp client cannot send duplicate keys).
RAW = [
    b'{"execute": "query-jobs", "arguments": {"a": 1, "a": 2}}',
    b'{"execute": "block-job-pause", "arguments": {"device": "x", "device": "y"}}',
    b'{"execute": "query-jobs", "id": 1, "id": 2}',
    b'{"execute": "query-jobs", "execute": "query-jobs"}',
    b'{"execute": "query-jobs", "arguments": {}, "arguments": {}}',
    b'{"execute": "block-stream", "arguments": {"device": "d0", "x": {"k": 1, "k": 1}}}',
    b'{"execute": "query-jobs", "id": {"a": [1, {"b": 2, "b": 3}]}}',
    b'{"execute": "query-jobs", "arguments": {}, "id": "fine"}',
]


ARGUMENT_ERRORS = ("Parameter '", "Invalid parameter type", "The command ", "Capabilities ")


def documented_errors() -> list[re.Pattern[str]]:
    """docs/QMP.md's error table, the rows of modern names, as patterns ('X' etc. any)."""
    text = (ROOT / "docs" / "QMP.md").read_text()
    table = text.split("### Errors", 1)[1].split("\n### ", 1)[0]
    out = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`"):
            desc = re.escape(cells[3])
            out.append(re.compile(re.sub(r"'(X|ID|B|S|V)'", "'[^']*'", desc)))
    return out


def drives(d: Path) -> tuple[Path, Path, Path]:
    d.mkdir()
    base = create(d / "base.qcow2", "32M")
    qemu_io(base, "write -P 0x5a 0 16M")
    top = create(d / "top.qcow2", "32M", "base.qcow2")
    ro = create(d / "ro.qcow2", "32M", "base.qcow2")
    raw = create(d / "r.raw", "1M", fmt="raw")
    return top, ro, raw


def answer(q: QMP, name: str, args: dict[str, Any]) -> Any:
    r = q.cmd(name, **args)
    return r.get("return", r.get("error"))


def job_events(q: QMP, quiet: float = 0.4) -> list[Any]:
    out: list[Any] = []
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        ev = q.next_event("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                          timeout=0.1)
        if ev is not None:
            data = dict(ev["data"])
            if ev["event"] == "BLOCK_JOB_CANCELLED":
                data.pop("offset")
            out.append((ev["event"], data))
            last = time.monotonic()
    return out


def raw_answers(sock: Path) -> list[Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        f = s.makefile("rwb")

        def read() -> Any:
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    return msg

        read()
        f.write(b'{"execute": "qmp_capabilities"}\n')
        f.flush()
        read()
        f.write(b"\n".join(RAW) + b"\n")
        f.flush()
        return [read() for _ in RAW]


def play(sock: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    with qmp_session(sock) as q:
        rec["calls"] = [(n, a, answer(q, n, a)) for n, a in CALLS]
        rec["calls events"] = job_events(q)
        assert answer(q, S, {"device": "d0", "job-id": "j1", "speed": MiB}) == {}
        rec["running"] = [(n, a, answer(q, n, a)) for n, a in RUNNING]
        assert answer(q, "job-cancel", {"id": "j1"}) == {}
        wait_until(lambda: not q.ok("query-jobs"))
        for device, base in (("r0", None), ("d0", "base.qcow2")):  # nothing to copy
            args = {"device": device, "job-id": "j3"} | ({"base": base} if base else {})
            assert answer(q, S, args) == {}
            wait_until(lambda: not q.ok("query-jobs"))
        rec["job events"] = job_events(q)
    rec["raw"] = raw_answers(sock)
    return rec


@pytest.mark.slow
def test_modern_names_answer_as_qsd(tmp_path: Path) -> None:
    q_top, q_ro, q_raw = drives(tmp_path / "q")
    v_top, v_ro, v_raw = drives(tmp_path / "v")
    nodes = (Node("d0", q_top), Node("ro", q_ro, read_only=True), Node("r0", q_raw, "raw"))
    with qsd_serving(tmp_path, *nodes) as sock:
        want = play(sock)
    specs = (f"id=d0,file={v_top},copy-on-read=off", f"id=ro,file={v_ro},read-only=on",
             f"id=r0,file={v_raw},format=raw")
    with serving(tmp_path, *specs, extra=ENGINE) as srv:
        got = play(srv.qmp_path)
        assert srv.stop() == 0, srv.stderr
    for key in want:
        assert got[key] == want[key], key
    # docs/QMP.md's table words every refusal qsd gave (besides argument checks)
    patterns = documented_errors()
    for name, args, ans in want["calls"] + want["running"]:
        if "desc" in ans and not ans["desc"].startswith(ARGUMENT_ERRORS):
            assert any(p.fullmatch(ans["desc"]) for p in patterns), (name, args, ans)
    assert want["calls events"] == [("JOB_STATUS_CHANGE", {"id": "j", "status": s})
                                    for s in ("created", "null") * 2]


def test_seed_names_keep_the_seed_classes(tmp_path: Path) -> None:
    top, ro, raw = drives(tmp_path / "v")
    specs = (f"id=d0,file={top},copy-on-read=off", f"id=ro,file={ro},read-only=on",
             f"id=r0,file={raw},format=raw")
    with serving(tmp_path, *specs, extra=ENGINE) as srv, qmp_session(srv.qmp_path) as q:
        assert q.err("block_stream", device="nope")[0] == "DeviceNotFound"
        assert q.err("block_stream", device="r0")[0] == "NotSupported"
        assert q.err("block_stream", device="ro")[0] == "NotSupported"
        assert q.err("block_stream", device="d0", base="x.qcow2")[0] == "BaseNotFound"
        for name, args in (("block_job_set_speed", {"value": 1}), ("block_job_cancel", {})):
            assert q.err(name, device="d0", **args) == (
                "DeviceNotActive", "No active block job on device 'd0'")
        q.ok("block-stream", device="d0", speed=MiB)
        assert q.err("block_stream", device="d0")[0] == "DeviceInUse"
        assert q.ok("block_job_set_speed", device="d0", value=2 * MiB) == {}
        assert q.ok("block_job_cancel", device="d0") == {}
        assert q.err("block_job_cancel", device="d0")[0] in ("DeviceInUse", "DeviceNotActive")
        q.wait_event("BLOCK_JOB_CANCELLED")
        assert srv.stop() == 0, srv.stderr
