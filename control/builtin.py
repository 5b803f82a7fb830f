"""The basic commands: qmp_capabilities, query-commands, query-version, quit, query-block.

The version is QEMU-like because QMP clients read it: qemu.qmp only needs the shape, and
we report 7.2.0, the QEMU release whose qemu-img the project is tested against; "package"
says what really answers ("vdisk X.Y.Z").
"""

from __future__ import annotations

from typing import Any

from control.errors import generic
from control.registry import Context, ListOf, Registry
from vdisk import __version__

QEMU_VERSION = (7, 2, 0)
CAPABILITIES: list[str] = []  # offered in the greeting; vdisk offers none (no "oob")


def version_info() -> dict[str, Any]:
    """The query-version answer, also the "version" member of the greeting."""
    major, minor, micro = QEMU_VERSION
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"vdisk {__version__}",
    }


async def qmp_capabilities(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    for cap in args.get("enable", []):
        if cap not in CAPABILITIES:
            raise generic(f"Capability '{cap}' is not available")
    return {}


async def query_commands(ctx: Context, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in ctx.registry.names()]


async def query_version(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    return version_info()


async def quit_(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    ctx.call_after_reply(ctx.backend.request_quit)
    return {}


async def query_block(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [drive.query_block() for drive in ctx.backend.drives().values()]


def register_builtins(registry: Registry) -> None:
    registry.add("qmp_capabilities", {"*enable": ListOf("str")}, qmp_capabilities)
    registry.add("query-commands", None, query_commands)
    registry.add("query-version", None, query_version)
    registry.add("quit", None, quit_)
    registry.add("query-block", None, query_block)


def make_registry() -> Registry:
    """A registry holding the builtin commands; others add theirs with registry.add()."""
    registry = Registry()
    register_builtins(registry)
    return registry
