"""`vdisk check`: consistency check (and repair) of a qcow2 image, like `qemu-img check`.

Exit status as qemu-img check: 0 clean, 2 corruptions, 3 leaks only, 1 check errors,
63 for raw images (no metadata to check).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vdisk.cli._common import FORMAT_HINT, UsageError, lock_hint
from vdisk.cli._qjson import dumps as qemu_json
from vdisk.engine.chain import check_image_file, close_chain, open_chain, probe_servable
from vdisk.engine.qcow2 import CheckResult, check_qcow2
from vdisk.errors import LockError


def exit_code(result: CheckResult) -> int:
    if result.failed is not None or result.check_errors:
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def as_json(result: CheckResult, filename: str) -> dict[str, Any]:
    """qemu-img's ImageCheck in QAPI schema order (zero counts left out, as qemu-img)."""
    doc: dict[str, Any] = {"filename": filename, "format": "qcow2",
                           "check-errors": result.check_errors}
    for key, value in (("image-end-offset", result.image_end_offset),
                       ("corruptions", result.corruptions), ("leaks", result.leaks),
                       ("corruptions-fixed", result.corruptions_fixed),
                       ("leaks-fixed", result.leaks_fixed),
                       ("total-clusters", result.total_clusters),
                       ("allocated-clusters", result.allocated_clusters),
                       ("fragmented-clusters", result.fragmented_clusters),
                       ("compressed-clusters", result.compressed_clusters)):
        if value:
            doc[key] = value
    return doc


def as_human(result: CheckResult) -> str:
    corr, leaks, errs = result.corruptions, result.leaks, result.check_errors
    out: list[str] = []
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
    total, alloc = result.total_clusters, result.allocated_clusters
    if total and alloc:
        frag, comp = result.fragmented_clusters, result.compressed_clusters
        out.append(f"{alloc}/{total} = {alloc * 100.0 / total:0.2f}% allocated, "
                   f"{frag * 100.0 / alloc:0.2f}% fragmented, "
                   f"{comp * 100.0 / alloc:0.2f}% compressed clusters")
    if result.image_end_offset:
        out.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(out) + "\n"


def repaired_banner(result: CheckResult) -> str:
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n")


def _open_backing(path: str, force_share: bool) -> None:
    """Fail as qemu-img check does when the backing chain does not open (exit 1)."""
    try:
        close_chain(open_chain(path, read_only=True, force_share=True,
                               backing_owner_check=False))
    except LockError:
        pass  # the check itself takes (or skips) the locks and says so



def run(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    check_image_file(path, "image")
    fmt = args.format or probe_servable(path, FORMAT_HINT)
    if fmt not in ("qcow2", "raw"):
        raise UsageError(f"unknown format {fmt!r} (use qcow2 or raw)")
    if fmt == "raw":
        print(f"vdisk: {args.file}: This image format does not support checks",
              file=sys.stderr)
        return 63
    if args.repair and args.force_share:
        raise UsageError("-r cannot be combined with -U (repair needs the write lock)")
    _open_backing(path, args.force_share)
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
    if result.failed is not None:
        print(f"vdisk: {args.file}: Check failed: {result.failed}", file=sys.stderr)
        return 1
    quiet = args.quiet
    if args.output == "json":
        text = qemu_json(as_json(result, args.file)) + "\n"
    else:
        text = as_human(result)
        if result.leaks_fixed or result.corruptions_fixed:
            text = repaired_banner(result) + text
    if not quiet:
        sys.stdout.write(text)
    if result.check_errors:
        print(f"vdisk: {args.file}: Check failed", file=sys.stderr)
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
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on stdout")
    p.set_defaults(func=run)
