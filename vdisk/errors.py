"""Errors that reach the user as one clear line."""

from __future__ import annotations


class VdiskError(Exception):
    """Base of every error shown to the user as one line (no traceback)."""


class ImageError(VdiskError):
    """Something is wrong with one image file; the message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnsupportedImageError(ImageError):
    """The image uses a feature vdisk refuses (encryption, external data file, ...)."""


class CorruptImageError(ImageError):
    """The image's metadata is inconsistent or points outside the file."""


class ChainError(ImageError):
    """The backing chain is broken: missing file, loop, absurd depth, bad name."""


class LockError(ImageError):
    """Another process (QEMU or vdisk) holds a conflicting lock on the image."""


class ReadOnlyError(ImageError):
    """A write was attempted on an image opened read-only."""
