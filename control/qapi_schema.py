"""query-qmp-schema: the commands of the registry as QEMU's SchemaInfo list
(qapi/introspect.json), generated from each command's own argument specs.

As QEMU does, the schema names only the builtin types ("str", "int", "bool", "number",
"any", "null"); every other type is named by a number ("0" is the empty object, the
argument type of the commands without arguments), arrays "[ELEMENT]". A parameter's
schema types map to: "str", "int", "bool", "number", "any" -> those builtins; "list"
-> "[any]"; "dict" -> "any" (an object of any keys has no SchemaInfo of its own);
Enum -> an enum type; ListOf(t) -> an array of t. An optional parameter has
"default": null, as in QEMU.

The registry does not say what a command returns: the queries ("query-*") return "any"
and every other command the empty object, which is what vdisk's commands do. The
events are listed with their members (EVENTS below).
"""

from __future__ import annotations

import json
from typing import Any

from control.registry import Context, Enum, ListOf, Param, Registry, TypeSpec

BUILTINS = {"str": "string", "int": "int", "bool": "boolean", "number": "number",
            "any": "value", "null": "null"}

# The events vdisk emits, with their members as the registry's schema types.
EVENTS: dict[str, dict[str, TypeSpec]] = {
    "SHUTDOWN": {"guest": "bool", "reason": Enum("host-error", "host-qmp-quit",
                                                 "host-signal")},
    "BLOCK_JOB_COMPLETED": {"type": Enum("stream"), "device": "str", "len": "int",
                            "offset": "int", "speed": "int", "*error": "str"},
    "BLOCK_JOB_CANCELLED": {"type": Enum("stream"), "device": "str", "len": "int",
                            "offset": "int", "speed": "int"},
    "BLOCK_JOB_ERROR": {"device": "str", "operation": Enum("read", "write"),
                        "action": Enum("ignore", "report", "stop")},
}


class SchemaBuilder:
    """Collects SchemaInfo entries, one per distinct type, numbering the named ones."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._by_body: dict[str, str] = {}  # JSON of an entry without its name -> name
        self._used_builtins: set[str] = set()
        self._next = 0
        self.empty = self._named({"meta-type": "object", "members": []})

    def _named(self, body: dict[str, Any], name: str | None = None) -> str:
        key = json.dumps(body, sort_keys=True)
        if key in self._by_body:
            return self._by_body[key]
        if name is None:
            name = str(self._next)
            self._next += 1
        self._by_body[key] = name
        self.entries.append({"name": name, **body})
        return name

    def builtin(self, name: str) -> str:
        if name not in self._used_builtins:
            self._used_builtins.add(name)
            self.entries.append({"name": name, "meta-type": "builtin",
                                 "json-type": BUILTINS[name]})
        return name

    def type(self, spec: TypeSpec) -> str:
        """The SchemaInfo name of a registry type spec."""
        if isinstance(spec, Enum):
            return self._named({"meta-type": "enum", "values": list(spec.values),
                                "members": [{"name": v} for v in spec.values]})
        if isinstance(spec, ListOf):
            return self.array(self.type(spec.item))
        if spec == "list":
            return self.array(self.builtin("any"))
        if spec == "dict":
            return self.builtin("any")
        return self.builtin(spec)

    def array(self, element: str) -> str:
        return self._named({"meta-type": "array", "element-type": element}, f"[{element}]")

    def object(self, params: tuple[Param, ...]) -> str:
        if not params:
            return self.empty
        members = []
        for p in params:
            member: dict[str, Any] = {"name": p.name, "type": self.type(p.type)}
            if p.optional:
                member["default"] = None
            members.append(member)
        return self._named({"meta-type": "object", "members": members})


def _params(schema: dict[str, TypeSpec]) -> tuple[Param, ...]:
    return tuple(Param(k.lstrip("*"), v, k.startswith("*")) for k, v in schema.items())


def qmp_schema(registry: Registry) -> list[dict[str, Any]]:
    """The SchemaInfo list of every command of `registry` (aliases included) and of the
    events vdisk emits."""
    b = SchemaBuilder()
    commands = []
    for name in registry.names():
        command = registry.lookup(name)
        assert command is not None
        ret = b.builtin("any") if name.startswith("query-") else b.empty
        commands.append({"name": name, "meta-type": "command",
                         "arg-type": b.object(command.params), "ret-type": ret})
    events = [{"name": name, "meta-type": "event", "arg-type": b.object(_params(members))}
              for name, members in EVENTS.items()]
    return commands + events + b.entries


async def query_qmp_schema(ctx: Context, args: dict[str, Any]) -> list[dict[str, Any]]:
    return qmp_schema(ctx.registry)


def register_qapi_schema(registry: Registry) -> None:
    registry.add("query-qmp-schema", None, query_qmp_schema)
