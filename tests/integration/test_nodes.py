"""Node names: query-named-block-nodes, node-name in query-block, block-stream by node
name and base-node. qemu-storage-daemon 7.2 on the same chain is the oracle: the same
nodes (format and protocol) with the same drv, file, ro, backing_file(_depth) and image
info; only the names it makes up differ from vdisk's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.chains import make_chain
from tests.helpers.commands import qemu_img, qemu_info, qemu_map, run
from tests.helpers.daemon import run_serve, serving
from tests.helpers.qmp import QMP, qmp_session
from tests.helpers.qsd import needs_qsd, qsd_chain


def by_node(nodes: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Nodes keyed by (file, drv), their made-up names left out."""
    out = {}
    for n in nodes:
        n = dict(n)
        if n["node-name"].startswith("#"):
            n.pop("node-name")
        out[(n["file"], n["drv"])] = n
    return out


def differences(got: Any, want: Any, path: str = "") -> list[str]:
    """Where two JSON values differ (paths), for readable failures."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(got) | set(want)):
            if k not in got or k not in want:
                out.append(f"{path}/{k}: only in {'want' if k in want else 'got'}")
            else:
                out += differences(got[k], want[k], f"{path}/{k}")
        return out
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def order(nodes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(n["file"], n["drv"]) for n in nodes]


def copy_chain(src: dict[str, Path], dest: Path) -> dict[str, Path]:
    dest.mkdir()
    for p in src.values():  # holes stay holes (the maps are compared)
        run("cp", "--sparse=always", p, dest / p.name)
    out = {k: dest / p.name for k, p in src.items()}
    qemu_img("rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", out["top"], cwd=dest)
    return out


@needs_qsd
@pytest.mark.parametrize("flat", [False, True])
def test_named_block_nodes_match_qsd(tmp_path: Path, flat: bool) -> None:
    chain = make_chain(tmp_path)
    with qsd_chain(tmp_path, chain["top"]) as sock, qmp_session(sock) as q:
        want = q.ok("query-named-block-nodes", flat=flat)
    with serving(tmp_path, f"id=d0,file={chain['top']},copy-on-read=off,node-name=top"
                 ) as srv, qmp_session(srv.qmp_path) as q:
        got = q.ok("query-named-block-nodes", flat=flat)
        block = q.ok("query-block")
    assert len(want) == 6  # three images, each a format and a protocol node
    assert order(got) == order(want)
    assert differences(by_node(got), by_node(want)) == []
    assert ("backing-image" in str(got)) is (not flat)
    # query-block's inserted is the top node's entry (with the backing chain nested)
    top = next(n for n in got if n["node-name"] == "top")
    if not flat:
        assert block[0]["inserted"] == top


def test_made_up_names_and_given_ones(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    other = copy_chain(chain, tmp_path / "other")
    with serving(tmp_path,
                 f"id=d0,file={chain['top']},copy-on-read=off",
                 f"id=d1,file={other['top']},read-only=on,node-name=t1,backing.node-name=m1,"
                 "backing.backing.file.node-name=b1-file") as srv, qmp_session(srv.qmp_path) as q:
        names = [(n["node-name"], n["file"], n["drv"], n["ro"])
                 for n in q.ok("query-named-block-nodes")]
        block = {b["device"]: b["inserted"]["node-name"] for b in q.ok("query-block")}
    assert names == [
        ("#d0.2", str(chain["base"]), "raw", True),
        ("#d0.2.file", str(chain["base"]), "file", True),
        ("#d0.1", str(chain["mid"]), "qcow2", True),
        ("#d0.1.file", str(chain["mid"]), "file", True),
        ("#d0.0", str(chain["top"]), "qcow2", False),
        ("#d0.0.file", str(chain["top"]), "file", False),
        ("#d1.2", str(other["base"]), "raw", True),
        ("b1-file", str(other["base"]), "file", True),
        ("m1", str(other["mid"]), "qcow2", True),
        ("#d1.1.file", str(other["mid"]), "file", True),
        ("t1", str(other["top"]), "qcow2", True),
        ("#d1.0.file", str(other["top"]), "file", True),
    ]
    assert block == {"d0": "#d0.0", "d1": "t1"}


def test_node_names_from_config(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    conf = tmp_path / "vdisk.toml"
    conf.write_text(f'''
[[drive]]
id = "d0"
file = "{chain['top']}"
copy-on-read = false
node-name = "top"
"file.node-name" = "top-file"
backing.node-name = "mid"
backing.backing.node-name = "base"
backing.backing.file.node-name = "base-file"
''')
    with serving(tmp_path, extra=["--config", str(conf)]) as srv:
        names = [n["node-name"] for n in srv.qmp("query-named-block-nodes")]
    assert names == ["base", "base-file", "mid", "#d0.1.file", "top", "top-file"]


@pytest.mark.parametrize("lines, message", [
    ('backing.node-name = "2x"', "[[drive]] #1: backing.node-name: '2x' is not a valid node "
                                 "name"),
    ("backing.node-name = 3", "[[drive]] #1: backing.node-name: expected a string, got int"),
    ('backing.nodename = "x"', "[[drive]] #1: backing.nodename: unknown key"),
])
def test_bad_node_names_in_config(tmp_path: Path, lines: str, message: str) -> None:
    chain = make_chain(tmp_path)
    conf = tmp_path / "vdisk.toml"
    conf.write_text(f'[[drive]]\nid = "d0"\nfile = "{chain["top"]}"\n{lines}\n')
    res = run_serve(tmp_path, ["--config", str(conf), "--mount", str(tmp_path / "mnt"),
                               "--qmp", str(tmp_path / "q.sock")])
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert f"{conf}: {message}" in line


@pytest.mark.parametrize("opts, message", [
    ("node-name=1top", "--drive id=d0,file=TOP,node-name=1top: node-name: '1top' is not a "
                       "valid node name"),
    ("node-name=" + "n" * 32, "is longer than 31 characters"),
    ("backing.backing.backing.node-name=deep",
     "drive d0: backing.backing.backing.node-name=deep: the chain of TOP has no image at "
     "depth 3"),
    ("node-name=x,backing.node-name=x", "drive d0: duplicate node name 'x'"),
    ("node-name=d1", "drive d0: node name 'd1' is the id of a drive"),
    ("backing.nodename=x", "unknown option 'backing.nodename'"),
])
def test_bad_node_names_are_refused(tmp_path: Path, opts: str, message: str) -> None:
    chain = make_chain(tmp_path)
    other = copy_chain(chain, tmp_path / "other")
    res = run_serve(tmp_path, ["--mount", str(tmp_path / "mnt"), "--qmp",
                               str(tmp_path / "q.sock"),
                               "--drive", f"id=d0,file={chain['top']},{opts}",
                               "--drive", f"id=d1,file={other['top']}"])
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert message.replace("TOP", str(chain["top"])) in lines[0]
    assert not (tmp_path / "mnt").exists()


def depth_runs(top: Path) -> list[tuple[int, int, int]]:
    """qemu-img map as (start, length, depth) runs: which layer holds each range (how the
    host file stores the top's clusters, sparse or not, is left out)."""
    runs: list[tuple[int, int, int]] = []
    for e in qemu_map(top):
        if runs and runs[-1][2] == e["depth"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + e["length"], e["depth"])
        else:
            runs.append((e["start"], e["length"], e["depth"]))
    return runs


def wait_done(q: QMP) -> dict[str, Any]:
    ev = q.wait_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", timeout=60)
    assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"], ev
    return ev


@needs_qsd
@pytest.mark.parametrize("backing_file", [None, "BASE"])
def test_stream_to_base_node_like_qsd(tmp_path: Path, backing_file: str | None) -> None:
    (tmp_path / "v").mkdir()
    mine = make_chain(tmp_path / "v")
    theirs = copy_chain(mine, tmp_path / "q")
    extra = {} if backing_file is None else {"backing-file": str(mine["base"])}
    with qsd_chain(tmp_path, theirs["top"]) as sock, qmp_session(sock) as q:
        base = next(n["node-name"] for n in q.ok("query-named-block-nodes")
                    if n["drv"] == "raw")
        extra_q = {} if backing_file is None else {"backing-file": str(mine["base"])}
        assert q.ok("block-stream", **{"job-id": "j0", "device": "top", "base-node": base},
                    **extra_q) == {}
        wait_done(q)
        want_nodes = q.ok("query-named-block-nodes")
    with serving(tmp_path, f"id=d0,file={mine['top']},copy-on-read=off,node-name=top,"
                 "backing.backing.node-name=base") as srv, qmp_session(srv.qmp_path) as q:
        before = {n["node-name"] for n in q.ok("query-named-block-nodes")}
        assert q.ok("block-stream", **{"device": "top", "base-node": "base"}, **extra) == {}
        ev = wait_done(q)
        assert ev["data"]["device"] == "d0"  # the job is named after the drive, as QEMU does
        got_nodes = q.ok("query-named-block-nodes")
    # the images left keep their names: base, its protocol node "#d0.2.file", the top's
    assert {n["node-name"] for n in got_nodes} == before - {"#d0.1", "#d0.1.file"}
    assert [n["drv"] for n in got_nodes] == [n["drv"] for n in want_nodes]
    for got, want in zip(got_nodes, want_nodes, strict=True):
        for key in ("drv", "ro", "backing_file_depth"):
            assert got.get(key) == want.get(key), key
        for key in ("file", "backing_file"):  # the same names, in the two folders
            if want.get(key, "").startswith("json:"):
                continue  # QEMU's name for a node whose backing is not the header's
            assert Path(got.get(key, "")).name == Path(want.get(key, "")).name, key
    assert depth_runs(mine["top"]) == depth_runs(theirs["top"])
    qemu_img("compare", mine["top"], theirs["top"])  # the same guest view
    mi, ti = qemu_info(mine["top"]), qemu_info(theirs["top"])
    # base-node writes the base's file name as opened, backing-file the name given
    assert mi["backing-filename"] == str(mine["base"])
    assert ti["backing-filename"] == str(mine["base"] if backing_file else theirs["base"])
    assert mi["backing-filename-format"] == ti["backing-filename-format"] == "raw"


@needs_qsd
def test_stream_node_errors_like_qsd(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    bad: list[dict[str, Any]] = [
        {"device": "top", "base-node": "nosuch"},
        {"device": "top", "base-node": "top"},
        {"device": "top", "base": "base.raw", "base-node": "BASE"},
        {"device": "top", "base-node": "BASEFILE"},
    ]

    def answers(q: QMP, base: str, base_file: str) -> list[tuple[str, str]]:
        out = []
        for args in bad:
            args = {k: {"BASE": base, "BASEFILE": base_file}.get(v, v) for k, v in args.items()}
            cls, desc = q.err("block-stream", **{"job-id": "j0"}, **args)
            out.append((cls, desc.replace(base_file, "BASEFILE")))
        assert q.jobs() == []
        return out

    with qsd_chain(tmp_path, chain["top"]) as sock, qmp_session(sock) as q:
        nodes = q.ok("query-named-block-nodes")
        want = answers(q, nodes[0]["node-name"], nodes[1]["node-name"])
    with serving(tmp_path, f"id=d0,file={chain['top']},node-name=top") as srv, \
            qmp_session(srv.qmp_path) as q:
        got = answers(q, "#d0.2", "#d0.2.file")
        # an image below the top is no stream target in vdisk (QEMU streams into it)
        cls, desc = q.err("block-stream", device="#d0.1")
        assert cls == "GenericError" and "not the top image of a drive" in desc
        assert q.jobs() == []
    assert got == want
    assert qemu_info(chain["top"])["backing-filename"] == str(chain["mid"])

