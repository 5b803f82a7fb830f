"""`vdisk check`: consistency check (and repair) of a qcow2 image, like `qemu-img check`.

Exit status as qemu-img check: 0 clean, 2 corruptions, 3 leaks only, 1 check errors.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import struct
import sys
from typing import Any

from vdisk.chain import check_plain_file, probe_servable
from vdisk.cli._common import FORMAT_HINT, UsageError, lock_hint
from vdisk.cli._qcow2stats import check_stats
from vdisk.errors import ImageError, LockError


def _int(result: Any, name: str) -> int:
    value = getattr(result, name, 0)
    return int(value or 0)


def _fixed(result: Any) -> tuple[int, int]:
    """(leaks fixed, corruptions fixed) from whatever shape the result reports."""
    if hasattr(result, "leaks_fixed") or hasattr(result, "corruptions_fixed"):
        return _int(result, "leaks_fixed"), _int(result, "corruptions_fixed")
    fixed = getattr(result, "fixed", None)
    if isinstance(fixed, dict):
        return int(fixed.get("leaks", 0)), int(fixed.get("corruptions", 0))
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        return int(fixed[0]), int(fixed[1])
    return 0, 0


def exit_code(result: Any) -> int:
    if _int(result, "check_errors"):
        return 1
    if _int(result, "corruptions"):
        return 2
    if _int(result, "leaks"):
        return 3
    return 0


def as_json(result: Any, filename: str, stats: dict[str, int]) -> dict[str, Any]:
    doc: dict[str, Any] = {"filename": filename, "format": "qcow2",
                           "check-errors": _int(result, "check_errors")}
    for key in ("corruptions", "leaks"):
        if _int(result, key):
            doc[key] = _int(result, key)
    leaks_fixed, corr_fixed = _fixed(result)
    if leaks_fixed:
        doc["leaks-fixed"] = leaks_fixed
    if corr_fixed:
        doc["corruptions-fixed"] = corr_fixed
    for key, value in stats.items():
        if value:
            doc[key] = value
    return doc


def as_human(result: Any, stats: dict[str, int]) -> str:
    corr, leaks, errs = (_int(result, k) for k in ("corruptions", "leaks", "check_errors"))
    out: list[str] = []
    leaks_fixed, corr_fixed = _fixed(result)
    if leaks_fixed or corr_fixed:
        out.append("The following inconsistencies were found and repaired:\n")
        out.append(f"    {leaks_fixed} leaked clusters")
        out.append(f"    {corr_fixed} corruptions\n")
        out.append("Double checking the fixed image now...")
    if not (corr or leaks or errs):
        out.append("No errors were found on the image.")
    if corr:
        out.append(f"\n{corr} errors were found on the image.\nData may be corrupted, or "
                   "further writes to the image may corrupt it.")
    if leaks:
        out.append(f"\n{leaks} leaked clusters were found on the image.\nThis means waste "
                   "of disk space, but no harm to data.")
    if errs:
        out.append(f"\n{errs} internal errors have occurred during the check.")
    total, alloc = stats.get("total-clusters", 0), stats.get("allocated-clusters", 0)
    if total and alloc:
        frag, comp = stats["fragmented-clusters"], stats["compressed-clusters"]
        out.append(f"{alloc}/{total} = {alloc * 100.0 / total:0.2f}% allocated, "
                   f"{frag * 100.0 / alloc:0.2f}% fragmented, "
                   f"{comp * 100.0 / alloc:0.2f}% compressed clusters")
    end = stats.get("image-end-offset", 0)
    if end:
        out.append(f"Image end offset: {end}")
    return "\n".join(out) + "\n"


def _check_unlocked(path: str) -> Any:
    """A read-only check without locks (-U), from the checker's own steps."""
    from vdisk.qcow2 import check as qcheck

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    try:
        return qcheck._run(path, fd, False, False)
    except OSError as e:
        raise ImageError(path, f"cannot check: {e.strerror}") from None
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    check_plain_file(path, "image")
    fmt = args.format or probe_servable(path, FORMAT_HINT)
    if fmt not in ("qcow2", "raw"):
        raise UsageError(f"unknown format {fmt!r} (use qcow2 or raw)")
    if fmt == "raw":
        print(f"{args.file}: raw image; it has no metadata, so there is nothing to check.")
        return 0
    if args.repair and args.force_share:
        raise UsageError("-r cannot be combined with -U (repair needs the write lock)")
    from vdisk.qcow2 import check_qcow2

    if args.force_share and "force_share" not in inspect.signature(check_qcow2).parameters:
        result = _check_unlocked(path)
    elif args.force_share:
        result = check_qcow2(path, repair=None, force_share=True)
    else:
        try:
            result = check_qcow2(path, repair=args.repair)
        except LockError as e:
            if args.repair:
                raise  # repairing needs the lock: stop the other user first
            raise lock_hint(e) from None
    for msg in getattr(result, "messages", None) or []:
        print(msg, file=sys.stderr)
    try:
        stats = check_stats(path)
    except (OSError, ValueError, struct.error):
        stats = {}  # a header too broken to walk: the check result says why
    if args.output == "json":
        sys.stdout.write(json.dumps(as_json(result, args.file, stats), indent=4) + "\n")
    else:
        sys.stdout.write(as_human(result, stats))
    return exit_code(result)


EPILOG = """\
examples:
  vdisk check top.qcow2                 # report; exit 0 clean, 3 leaks, 2 corrupt
  vdisk check -r leaks top.qcow2        # free leaked clusters
  vdisk check -U --output json /srv/images/vm1.qcow2   # while it is served
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "check", help="check (and repair) a qcow2 image's metadata",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("-f", "--format", help="image format (qcow2 or raw); probed if omitted")
    p.add_argument("-r", "--repair", choices=("leaks", "all"), help="repair leaks or everything")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locks (the image may be in use)")
    p.set_defaults(func=run)
