"""`vdisk demo`: build a small chain, serve it, stream it live and check it, then clean up.

Runs in a temporary folder (under $TMPDIR) that is removed at the end, also on Ctrl-C.
It needs FUSE: read and write access to /dev/fuse, and fusermount3 (package fuse3) for
users other than root. As root with loop devices, the served disk is mounted through a
loop device (read-only); elsewhere the demo says why and reads the raw drive file instead.
Host tools (mkfs.ext4, losetup, mount) are looked up on PATH, then in /usr/local/sbin,
/usr/sbin and /sbin.
"""

from __future__ import annotations

import argparse

from vdisk.cli._common import parse_size

EPILOG = """\
examples:
  vdisk demo                # the tour at 4 MB/s
  vdisk demo --speed 16M    # faster
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="a one-minute tour: build a chain, serve, stream live, verify, clean up",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--speed", default="4M",
                   help="stream speed in bytes per second (K/M/G suffixes; default 4M)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vdisk.cli._demo import run_demo

    return run_demo(speed=parse_size(args.speed, "--speed"))
