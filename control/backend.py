"""What the QMP commands need from the daemon: its drives and a way to ask it to quit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DriveView(Protocol):
    """One served drive as the commands see it."""

    def query_block(self) -> dict[str, Any]:
        """This drive's entry of query-block (see control.blockinfo.block_info)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """The daemon, as the QMP commands see it."""

    def drives(self) -> Mapping[str, DriveView]:
        """The drives by device id, in the order query-block lists them."""
        ...

    def request_quit(self) -> None:
        """Ask the daemon to shut down (called after the 'quit' answer was sent)."""
        ...
