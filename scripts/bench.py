"""vdisk against qemu-storage-daemon on the same backing chain; see docs/PERFORMANCE.md.

Run it through scripts/bench (which installs the tools first):

    scripts/bench [--size 1G] [--quick] [--paths LIST] [--json FILE] [--plot FILE.png]
                  [--profile DIR]

The I/O matrix runs the same fio jobs on each access path (--paths, default all):
fuse-direct (fio O_DIRECT on the served file), fuse-buffered (fio buffered on it),
loop-buffered and loop-direct (fio O_DIRECT on a loop device on it, in the loop device's
default buffered mode or with --direct-io=on), guest (fio in a TCG VM whose virtio disk is
the served file, cache=none).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_lib.chain import build_chain  # noqa: E402
from bench_lib.floor import table as floor_table  # noqa: E402
from bench_lib.paths import PATHS, parse_paths  # noqa: E402
from bench_lib.report import figures, plot, table, targets, write_json  # noqa: E402
from bench_lib.runner import Bench, Settings  # noqa: E402
from bench_lib.sides import VdiskSide  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (like 512M or 1G)")
    size = int(m.group(1)) * UNITS[m.group(2).upper()]
    if size < (16 << 20) or size % (1 << 20):
        raise argparse.ArgumentTypeError(f"'{text}': the size must be a whole number of MiB, "
                                         "at least 16M")
    return size


def machine() -> dict[str, Any]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "qemu": out(["qemu-storage-daemon", "--version"]).splitlines()[0],
        "qemu_img": out(["qemu-img", "--version"]).splitlines()[0],
        "fio": out(["fio", "--version"]),
        "python": platform.python_version(),
        "loadavg_end": " ".join(open("/proc/loadavg").read().split()[:3]),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
    }


def describe_vdisk(rev: str | None, work: Path) -> str:
    """Point VdiskSide at the tree or at REV's files (extracted into work); describe it."""
    def git(*a: str) -> str:
        res = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"git {' '.join(a)}: {res.stderr.strip()}")
        return res.stdout.strip()

    if rev is None:
        try:
            head = git("rev-parse", "--short", "HEAD")
            dirty = git("status", "--porcelain", "--", "vdisk", "control")
        except (RuntimeError, OSError):
            return "working tree"
        return f"working tree at {head}" + (" (with uncommitted changes)" if dirty else "")
    sha = git("rev-parse", "--short", f"{rev}^{{commit}}")
    dest = work / f"vdisk-{sha}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "vdisk", "control"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    VdiskSide.source = dest
    return f"commit {sha}"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None, help="chain size (default 1G)")
    p.add_argument("--quick", action="store_true",
                   help="small run: 64M chain, 1 s per fio run (for smoke tests)")
    p.add_argument("--runtime", type=float, default=None, help="seconds per fio run (10; 1 quick)")
    p.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench.json",
                   help="where to write the results (default bench-results/bench.json)")
    p.add_argument("--plot", type=Path, default=None, help="also draw the ratios (needs matplotlib)")
    p.add_argument("--profile", type=Path, default=None,
                   help="sample vdisk with py-spy during random 4K I/O and the stream, into DIR")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory (default: a new one under $TMPDIR; removed after)")
    p.add_argument("--vdisk-rev", default=None, metavar="REV",
                   help="benchmark vdisk as committed at git REV (default: the working tree)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--no-remote", action="store_true",
                   help="skip the remote-base figures (NBD with nbdkit's delay, HTTP with nginx)")
    p.add_argument("--only-remote", action="store_true",
                   help="only the remote-base figures")
    p.add_argument("--paths", default="all", metavar="LIST",
                   help=f"access paths of the I/O matrix, comma-separated: {', '.join(PATHS)} "
                   "(default all)")
    p.add_argument("--guest-cache", type=Path, default=ROOT / "bench-results" / "guest-cache",
                   help="where the VM guest's kernel and initramfs are kept between runs "
                   "(default bench-results/guest-cache)")
    args = p.parse_args(argv)
    try:
        paths = parse_paths(args.paths)
    except ValueError as e:
        p.error(str(e))
    size = args.size or ((64 << 20) if args.quick else (1 << 30))
    runtime = args.runtime or (1.0 if args.quick else 10.0)
    ramp = 0.0 if args.quick else 1.0
    if os.geteuid() != 0:
        print("bench: warning: not root; FUSE mounts may need /etc/fuse.conf user_allow_other",
              file=sys.stderr)
    tools = ["fio", "qemu-img", "qemu-storage-daemon", "fusermount3"]
    if any(path.loop for path in paths):
        tools.append("losetup")
    if any(path.guest for path in paths):
        tools += ["qemu-system-x86_64", "busybox", "apt-get", "dpkg-deb"]
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (run scripts/setup)", file=sys.stderr)
            return 1
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("bench: --plot needs matplotlib (scripts/bench installs it)", file=sys.stderr)
            return 1

    signal.signal(signal.SIGINT, _terminate)  # also when started with SIGINT ignored (&)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vdisk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = " ".join(open("/proc/loadavg").read().split()[:3])
    try:
        vdisk_src = describe_vdisk(args.vdisk_rev, work)
        print(f"bench: vdisk: {vdisk_src}", flush=True)
        print(f"bench: building a {size >> 20} MiB chain in {work}", flush=True)
        chain = build_chain(work / "src", (16 << 20) if args.only_remote else size)
        settings = Settings(work=work, runtime=runtime, ramp=ramp, profile=args.profile,
                            log=work / "fio.log", paths=tuple(paths),
                            guest_cache=args.guest_cache)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        bench = Bench(chain, settings)
        ref = bench.run_all(remote=not args.no_remote, local=not args.only_remote,
                            remote_size=(16 << 20) if args.quick else (256 << 20))
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    except Exception as e:  # report in one line; the servers are already stopped
        print(f"bench: failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figs = figures(bench.results)
    tgts = targets(figs, ref)
    mach = machine()
    mach["loadavg_start"] = load_start  # other work on the machine skews the figures
    doc = {
        "machine": mach,
        "config": {"vdisk": vdisk_src, "size": size, "runtime_s": runtime, "ramp_s": ramp, "quick": args.quick,
                   "fio": "ioengine=psync; direct=1 except on fuse-buffered (see PERFORMANCE.md)",
                   "paths": [path.name for path in paths],
                   "duration_s": round(time.time() - started, 1)},
        "figures": figs,
        "reference": ref,
        "targets": tgts,
        "raw": bench.results,
        "notes": bench.notes,
        "timings_s": bench.timings,
    }
    write_json(args.json, doc)
    print()
    print(table(figs, ref, tgts))
    if "request_floor" in ref:
        print()
        print(floor_table(ref["request_floor"]))
    for note in bench.notes:
        print(f"note: {note}")
    print(f"\nbench: results in {args.json}")
    if args.plot is not None:
        plot(args.plot, figs)
        print(f"bench: plot in {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
