"""Mount-point bookkeeping: mountinfo parsing (no daemon needed)."""

from __future__ import annotations

from pathlib import Path

from vdisk.service.mounts import VDISK_FSTYPE, mounts_at


def test_mountinfo_parsing(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "42 27 0:39 / /srv/my\\040disks rw,nosuid shared:5 - fuse.vdisk vdisk rw,user_id=0\n"
        "43 42 0:40 / /srv/my\\040disks rw - tmpfs none\\011x rw\n"
        "garbage line\n"
    )
    found = mounts_at("/srv/my disks", str(info), resolve=False)
    assert [(m.fstype, m.source, m.dev) for m in found] == [
        (VDISK_FSTYPE, "vdisk", "0:39"), ("tmpfs", "none\tx", "0:40")]
    assert mounts_at("/srv/my", str(info), resolve=False) == []
