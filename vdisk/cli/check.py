"""`vdisk check`: consistency check (and repair) of a qcow2 image, like `qemu-img check`.

Exit status as qemu-img check: 0 clean, 2 corruptions, 3 leaks only, 1 check errors.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Any

from vdisk.cli._common import FORMAT_HINT, UsageError, lock_hint
from vdisk.cli._qcow2stats import check_stats
from vdisk.engine.chain import check_plain_file, probe_servable
from vdisk.engine.qcow2 import CheckResult, check_qcow2
from vdisk.errors import LockError


def exit_code(result: CheckResult) -> int:
    if result.check_errors:
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def as_json(result: CheckResult, filename: str, stats: dict[str, int]) -> dict[str, Any]:
    doc: dict[str, Any] = {"filename": filename, "format": "qcow2",
                           "check-errors": result.check_errors}
    for key, count in (("corruptions", result.corruptions), ("leaks", result.leaks)):
        if count:
            doc[key] = count
    leaks_fixed, corr_fixed = result.leaks_fixed, result.corruptions_fixed
    if leaks_fixed:
        doc["leaks-fixed"] = leaks_fixed
    if corr_fixed:
        doc["corruptions-fixed"] = corr_fixed
    for key, value in stats.items():
        if value:
            doc[key] = value
    return doc


def as_human(result: CheckResult, stats: dict[str, int]) -> str:
    corr, leaks, errs = result.corruptions, result.leaks, result.check_errors
    out: list[str] = []
    leaks_fixed, corr_fixed = result.leaks_fixed, result.corruptions_fixed
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
    if args.force_share:
        result = check_qcow2(path, repair=None, force_share=True)
    else:
        try:
            result = check_qcow2(path, repair=args.repair)
        except LockError as e:
            if args.repair:
                raise  # repairing needs the lock: stop the other user first
            raise lock_hint(e) from None
    for msg in result.messages:
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
