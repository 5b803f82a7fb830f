"""The layers of docs/ARCHITECTURE.md, checked on the imports of every source module.

engine < block < {fuse, control} < service < cli, each importing only its own layer or
lower ones; control only from the composition root (vdisk.service.daemon and the CLI);
the engine imports no trio, FUSE or QMP; the qcow2 driver is used through its package
API only; no module imports another module's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [  # (package prefix, rank), most specific first
    ("vdisk.engine", 1),
    ("vdisk.block", 2),
    ("vdisk.fuse", 3),
    ("control", 3),
    ("vdisk.service", 4),
    ("vdisk.cli", 5),
    ("vdisk.__main__", 6),
    ("vdisk.errors", 0),
    ("vdisk", 0),  # vdisk/__init__ (version) and __main__ (the CLI entry)
]
COMPOSITION_ROOT = ("vdisk.service.daemon", "vdisk.cli", "vdisk.__main__")
ENGINE_FORBIDDEN = ("trio", "pyfuse3", "control", "vdisk.block", "vdisk.fuse")
QCOW2 = "vdisk.engine.qcow2"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(name: str) -> tuple[str, int]:
    for prefix, rank in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            return prefix, rank
    return "", -1  # third party or stdlib


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import statement in path."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


SOURCES = sorted(p for d in ("vdisk", "control") for p in (ROOT / d).rglob("*.py"))


def problems(path: Path) -> list[str]:
    me = module_name(path)
    my_layer, my_rank = layer(me)
    out = []
    for target, names, line in imports(path):
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        if target == "vdisk" and names:  # `from vdisk import x`: the submodule x
            target = f"vdisk.{names[0]}" if names[0] != "__version__" else "vdisk"
        their_layer, their_rank = layer(target)
        if their_rank > my_rank or (their_rank == my_rank and their_layer != my_layer):
            out.append(f"{where}: upward or sideways ({my_layer} -> {their_layer})")
        if their_layer == "control" and my_layer != "control" and not any(
                in_package(me, root) for root in COMPOSITION_ROOT):
            out.append(f"{where}: only the composition root imports control")
        if my_layer == "vdisk.engine" and any(in_package(target, f) for f in ENGINE_FORBIDDEN):
            out.append(f"{where}: the engine knows nothing of trio, FUSE or QMP")
        if in_package(target, QCOW2) and target != QCOW2 and not in_package(me, QCOW2):
            out.append(f"{where}: use the qcow2 package's API, not its internals")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and layer(target)[0] and target.rsplit(".", 1)[0] != me.rsplit(".", 1)[0]:
            out.append(f"{where}: private names {private} of another package")
    return out


def test_sources_found() -> None:
    assert len(SOURCES) > 50


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_respects_the_layers(path: Path) -> None:
    assert problems(path) == []


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an engine module importing trio and the block layer fails."""
    bad = ROOT / "vdisk" / "engine" / "_layers_probe.py"
    bad.write_text("import trio\nfrom vdisk.block.device import BlockDevice\n")
    try:
        found = problems(bad)
    finally:
        bad.unlink()
    assert any("upward" in p for p in found) and any("trio" in p for p in found)


def test_no_source_module_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in SOURCES
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
