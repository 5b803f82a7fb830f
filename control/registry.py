"""The command registry: names, argument schemas, and async handlers.

A schema maps parameter names to types; a leading '*' marks an optional parameter
(QAPI style): {"device": "str", "*speed": "int", "*on-error": Enum("report", "stop")}.
Types: "str", "int" (a JSON integer in int64 range, as QAPI's int; not a bool or float),
"bool", "number" (int or float, not bool), "list", "dict", "any", `Enum(*values)` (one of these strings) and `ListOf(type)`.
Arguments are checked completely before the handler runs, so a refused command has no
effect. Handlers are `async def handler(ctx: Context, args: dict) -> result` and raise
QMPError to fail; a None result is answered as {}.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from control.errors import COMMAND_NOT_FOUND, QMPError, generic
from vdisk.errors import VdiskError

if TYPE_CHECKING:
    from control.backend import Backend
    from control.events import EventBus

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class Enum:
    """A string that must be one of `values`."""

    values: tuple[str, ...]

    def __init__(self, *values: str) -> None:
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose elements all have type `item`."""

    item: TypeSpec


TypeSpec = str | Enum | ListOf

_TYPE_NAMES = {
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "number": "number",
    "list": "array",
    "dict": "object",
}


def _is_type(value: Any, spec: str) -> bool:
    if spec == "any":
        return True
    if spec == "str":
        return isinstance(value, str)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if spec == "list":
        return isinstance(value, list)
    if spec == "dict":
        return isinstance(value, dict)
    raise ValueError(f"unknown schema type {spec!r}")


def _wrong_type(name: str, expected: str) -> QMPError:
    """QEMU's wording (qobject-input-visitor, QERR_INVALID_PARAMETER_TYPE)."""
    return generic(f"Invalid parameter type for '{name}', expected: {expected}")


def check_value(name: str, value: Any, spec: TypeSpec) -> None:
    """Raise GenericError naming parameter `name` unless `value` matches `spec`, in
    QEMU 7.2's words: an int out of int64 range is of the wrong type, as there."""
    if isinstance(spec, Enum):
        if not isinstance(value, str):
            raise _wrong_type(name, "string")
        if value not in spec.values:
            raise generic(f"Parameter '{name}' does not accept value '{value}'")
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise _wrong_type(name, "array")
        for i, item in enumerate(value):
            check_value(f"{name}[{i}]", item, spec.item)
    elif not _is_type(value, spec):
        raise _wrong_type(name, _TYPE_NAMES[spec])
    elif spec == "int" and not INT64_MIN <= value <= INT64_MAX:
        raise _wrong_type(name, "integer")


@dataclass(frozen=True)
class Param:
    name: str
    type: TypeSpec
    optional: bool


def parse_schema(schema: Mapping[str, TypeSpec] | None) -> tuple[Param, ...]:
    """Turn {"device": "str", "*speed": "int"} into Params, checking the type names."""
    params = []
    for key, spec in (schema or {}).items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        if not name:
            raise ValueError("empty parameter name in schema")
        _validate_spec(spec)
        params.append(Param(name, spec, optional))
    return tuple(params)


def _validate_spec(spec: TypeSpec) -> None:
    if isinstance(spec, ListOf):
        _validate_spec(spec.item)
    elif isinstance(spec, str) and spec != "any" and spec not in _TYPE_NAMES:
        raise ValueError(f"unknown schema type {spec!r}")
    elif not isinstance(spec, str | Enum | ListOf):
        raise ValueError(f"bad schema type {spec!r}")


def validate_arguments(params: tuple[Param, ...], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The checked arguments (optional ones left out when absent); raises GenericError."""
    known = set()
    for p in params:
        known.add(p.name)
        if p.name not in arguments:
            if not p.optional:
                raise generic(f"Parameter '{p.name}' is missing")
            continue
        check_value(p.name, arguments[p.name], p.type)
    for key in arguments:
        if key not in known:
            raise generic(f"Parameter '{key}' is unexpected")
    return dict(arguments)


@dataclass
class Context:
    """What a handler gets besides its arguments."""

    backend: Backend
    events: EventBus
    registry: Registry
    client: str = ""  # a label for logs, e.g. "pid 1234 uid 0"
    after_reply: list[Callable[[], None]] = field(default_factory=list)

    def call_after_reply(self, fn: Callable[[], None]) -> None:
        """Run `fn` once this command's answer has been written (or given up on)."""
        self.after_reply.append(fn)


Handler = Callable[[Context, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    params: tuple[Param, ...]
    handler: Handler


class Registry:
    """Commands by name; aliases share the command (and are listed by query-commands)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(
        self,
        name: str,
        schema: Mapping[str, TypeSpec] | None,
        handler: Handler,
        *,
        aliases: Iterable[str] = (),
    ) -> Command:
        """Register `handler` under `name` (and `aliases`); a taken name is a ValueError."""
        command = Command(name, parse_schema(schema), handler)
        names = [name, *aliases]
        for n in names:
            if n in self._commands or names.count(n) > 1:
                raise ValueError(f"command {n!r} is already registered")
        for n in names:
            self._commands[n] = command
        return command

    def command(
        self,
        name: str,
        schema: Mapping[str, TypeSpec] | None = None,
        *,
        aliases: Iterable[str] = (),
    ) -> Callable[[Handler], Handler]:
        """Decorator form of `add`."""

        def register(handler: Handler) -> Handler:
            self.add(name, schema, handler, aliases=aliases)
            return handler

        return register

    def lookup(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        """Every registered name (aliases included), in registration order."""
        return list(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    async def execute(self, ctx: Context, name: str, arguments: Mapping[str, Any]) -> Any:
        """Look up, check arguments, run. Any failure is raised as QMPError."""
        command = self._commands.get(name)
        if command is None:
            raise QMPError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
        args = validate_arguments(command.params, arguments)
        try:
            result = await command.handler(ctx, args)
        except QMPError:
            raise
        except VdiskError as e:
            raise generic(str(e)) from e
        except OSError as e:
            raise generic(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from e
        except Exception as e:
            log.exception("command %s failed", name)
            raise generic(f"Internal error in {name}: {e}") from e
        return {} if result is None else result
