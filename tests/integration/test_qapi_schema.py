"""query-qmp-schema: well-formed SchemaInfo (qapi/introspect.json) for every command vdisk
has, and, for the commands QEMU 7.2 also has, arguments a client reading
qemu-storage-daemon's schema can send: same names, same JSON types, same optionality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers.chains import make_chain
from tests.helpers.daemon import serving
from tests.helpers.qmp import qmp_session
from tests.helpers.qsd import needs_qsd, qsd_chain

META = {"builtin", "enum", "array", "object", "alternate", "command", "event"}


def check_well_formed(schema: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_name = {e["name"]: e for e in schema}
    assert len(by_name) == len(schema), "names are unique"
    for e in schema:
        assert e["meta-type"] in META, e
        refs: list[str] = []
        if e["meta-type"] in ("command", "event"):
            refs.append(e["arg-type"])
            assert by_name[e["arg-type"]]["meta-type"] == "object"
        if e["meta-type"] == "command":
            refs.append(e["ret-type"])
        if e["meta-type"] == "array":
            refs.append(e["element-type"])
            assert e["name"] == f"[{e['element-type']}]"
        if e["meta-type"] == "object":
            for m in e["members"]:
                assert set(m) <= {"name", "type", "default", "features"}
                assert "default" not in m or m["default"] is None
                refs.append(m["type"])
        if e["meta-type"] == "enum":
            assert e["values"] == [m["name"] for m in e["members"]]
        if e["meta-type"] == "builtin":
            assert e["json-type"] in {"string", "number", "int", "boolean", "null",
                                      "object", "array", "value"}
        for r in refs:
            assert r in by_name, (e, r)
    return by_name


def json_type(by_name: dict[str, dict[str, Any]], name: str) -> Any:
    e = by_name[name]
    kind = e["meta-type"]
    if kind == "builtin":
        return e["json-type"]
    if kind == "enum":
        return ("enum", tuple(e["values"]))
    if kind == "array":
        return ("array", json_type(by_name, e["element-type"]))
    return kind


def args_of(by_name: dict[str, dict[str, Any]], command: str) -> dict[str, Any]:
    obj = by_name[by_name[command]["arg-type"]]
    return {m["name"]: (json_type(by_name, m["type"]), "default" in m) for m in obj["members"]}


@needs_qsd
def test_schema_against_qsd(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    with qsd_chain(tmp_path, chain["top"]) as sock, qmp_session(sock) as q:
        theirs = check_well_formed(q.ok("query-qmp-schema"))
    with serving(tmp_path, f"id=d0,file={chain['top']}") as srv, \
            qmp_session(srv.qmp_path) as q:
        schema = q.ok("query-qmp-schema")
        names = [c["name"] for c in q.ok("query-commands")]
    ours = check_well_formed(schema)
    assert [e["name"] for e in schema if e["meta-type"] == "command"] == names
    shared = [n for n in names if n in theirs]
    assert {"block-stream", "query-named-block-nodes", "query-blockstats",
            "query-qmp-schema", "query-block", "block-job-cancel"} <= set(shared)
    for name in shared:
        mine, qemu = args_of(ours, name), args_of(theirs, name)
        # every argument QEMU requires, vdisk takes (and requires)
        assert {a for a, (_, opt) in qemu.items() if not opt} == {
            a for a, (_, opt) in mine.items() if not opt}, name
        for arg, (kind, optional) in mine.items():
            assert arg in qemu, (name, arg)
            qkind, qoptional = qemu[arg]
            assert optional == qoptional, (name, arg)
            assert compatible(kind, qkind), (name, arg, kind, qkind)
        assert by_name_ret(ours, name) in ("object", "value"), name
    events = {e["name"] for e in schema if e["meta-type"] == "event"}
    assert {"SHUTDOWN", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"} <= events
    for ev in events & {e["name"] for e in theirs.values() if e["meta-type"] == "event"}:
        mine, qemu = args_of(ours, ev), args_of(theirs, ev)
        assert set(mine) <= set(qemu), ev


def compatible(mine: Any, qemu: Any) -> bool:
    """vdisk's type takes what QEMU's says: the same JSON type, an enum with a subset of
    QEMU's values, or a string where QEMU has an enum (vdisk checks the value itself)."""
    if isinstance(mine, tuple) and mine[0] == "array":
        return isinstance(qemu, tuple) and qemu[0] == "array" and compatible(mine[1], qemu[1])
    if isinstance(mine, tuple) and mine[0] == "enum":
        return isinstance(qemu, tuple) and qemu[0] == "enum" and set(mine[1]) <= set(qemu[1])
    if mine == "string" and isinstance(qemu, tuple) and qemu[0] == "enum":
        return True
    return bool(mine == qemu)


def by_name_ret(by_name: dict[str, dict[str, Any]], command: str) -> Any:
    return json_type(by_name, by_name[command]["ret-type"])
