"""QMP errors: an error class name (GenericError, CommandNotFound, ...) and a description."""

from __future__ import annotations

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"
DEVICE_IN_USE = "DeviceInUse"
NOT_SUPPORTED = "NotSupported"
BASE_NOT_FOUND = "BaseNotFound"


class QMPError(Exception):
    """An error answered to the client as {"error": {"class": cls, "desc": desc}}.

    Command handlers raise it; the server turns it into the error response.
    """

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc

    def to_json(self) -> dict[str, str]:
        return {"class": self.cls, "desc": self.desc}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QMPError):
            return NotImplemented
        return (self.cls, self.desc) == (other.cls, other.desc)

    def __hash__(self) -> int:
        return hash((self.cls, self.desc))


def generic(desc: str) -> QMPError:
    """A GenericError with this description."""
    return QMPError(GENERIC_ERROR, desc)
