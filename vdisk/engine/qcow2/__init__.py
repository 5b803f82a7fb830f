"""The qcow2 format driver (v2 and v3): open, create, check."""

from __future__ import annotations

from vdisk.engine.qcow2.check import CheckResult, check_qcow2
from vdisk.engine.qcow2.create import create_qcow2
from vdisk.engine.qcow2.header import is_qcow2
from vdisk.engine.qcow2.image import Qcow2Image
from vdisk.engine.qcow2.open import open_qcow2
from vdisk.engine.qcow2.snapshots import NO_ICOUNT, Snapshot, list_bitmaps, list_snapshots
from vdisk.engine.qcow2.source import open_qcow2_source

__all__ = ["NO_ICOUNT", "CheckResult", "Qcow2Image", "Snapshot", "check_qcow2", "create_qcow2",
           "is_qcow2", "list_bitmaps", "list_snapshots", "open_qcow2", "open_qcow2_source"]
