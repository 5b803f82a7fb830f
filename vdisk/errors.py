"""Errors that reach the user as one clear line."""

from __future__ import annotations

import os


def oserror(code: int, what: str) -> OSError:
    """OSError(code) whose message is the errno's text, then what."""
    return OSError(code, f"{os.strerror(code)}: {what}")


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


class JobError(VdiskError):
    """A block job refused a request. kind says why, in words the control plane maps to
    its own error classes: 'invalid' (a bad argument or a verb the job's state refuses),
    'in-use', 'not-active', 'not-supported' or 'base-not-found'."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
