"""Soak and crash loop for `vdisk serve`: random chains, random FUSE I/O against a model,
random streams, random kills and clean stops; every cycle is checked with qemu-img.

    scripts/torture [--minutes N] [--seed S] [--writers N] [--size 16M] [--json FILE] [-v]

Each cycle builds or continues a chain of 2 to 4 layers (qemu-img/qemu-io), serves it,
runs worker processes doing reads, unaligned writes, fsyncs and hole punches on the drive
file, drives streams over QMP, then kills the daemon (SIGKILL) or stops it (SIGTERM or
QMP quit). Then it checks, offline: qemu-img check (leaks are fine after a kill, and are
repaired), and the qemu-img convert view against the model (every write acknowledged by a
returned fsync is there; each sector holds one of its versions, never a mix). The next
cycle's daemon must clear the dead mount; its first reads are checked against the view.
Every few cycles, and at the end, a stream runs to completion, and the chain on disk must
then end at the stream's base. Exit status 1 on any mismatch, corruption or other failure;
the details name the seed and cycle (rerun with --seed to reproduce the same choices).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from torture_lib.chain import ChainBuilder, ToolError, chain_of, check  # noqa: E402
from torture_lib.model import WorkerLog, check_view  # noqa: E402
from torture_lib.qmpctl import StreamControl, StreamStats  # noqa: E402
from torture_lib.served import Served, StartError, force_unmount, is_mounted  # noqa: E402

from tests.helpers.chains import sha  # noqa: E402
from tests.helpers.commands import guest_view  # noqa: E402
from tests.helpers.qmp import QMP  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent
STREAM_EVERY = 3  # every Nth cycle runs a stream to completion
CHAIN_LIFE = 8  # a fresh chain after about this many cycles
MAX_DETAILS = 25  # failure lines printed


class Failure(Exception):
    """A check failed: the run stops with the details."""


@dataclass
class Summary:
    seed: int = 0
    cycles: int = 0
    sigkills: int = 0
    sigterms: int = 0
    quits: int = 0
    restarts: int = 0
    chains_built: int = 0
    layers_added: int = 0
    bytes_written: int = 0
    bytes_verified: int = 0
    worker_ops: int = 0
    fsyncs: int = 0
    punches: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    stream_commands: int = 0
    leaks_after_kill: int = 0
    mismatches: int = 0
    corruptions: int = 0
    failures: int = 0
    seconds: float = 0.0


class WorkerProc:
    def __init__(self, index: int, params: dict[str, Any], log_path: Path) -> None:
        self.log = WorkerLog(index)
        with open(log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torture_lib.worker", json.dumps(params)], cwd=SCRIPTS,
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.log.feed(json.loads(line))
            except ValueError:
                self.log.garbage.append(line.decode(errors="replace"))

    def finish(self, timeout: float) -> bool:
        """Wait for the worker to end (kill it after timeout); False if it had to be killed."""
        try:
            self.proc.wait(timeout=timeout)
            ok = True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            ok = False
        self.thread.join(timeout=30)
        return ok

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Torture:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.seed: int = args.seed
        self.rng = random.Random(self.seed)
        self.dir = workdir
        self.mount = workdir / "mnt"
        qmp_dir = workdir / "qmp"
        qmp_dir.mkdir(mode=0o700)
        os.chmod(qmp_dir, 0o700)
        self.qmp_path = qmp_dir / "sock"
        self.serve_log = workdir / "serve.log"
        self.worker_log = workdir / "workers.log"
        self.builder = ChainBuilder(workdir, args.size)
        self.top: Path | None = None
        self.ref = b""
        self.chain_age = 0
        self.eof_after_kill: dict[str, int] = {}  # image -> smallest file size after a kill
        self.served: Served | None = None
        self.workers: list[WorkerProc] = []
        self.summary = Summary(seed=self.seed)
        self.sstats = StreamStats()
        self.cycle = 0
        self.details: list[str] = []

    # -- helpers --------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.args.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] cycle {self.cycle}: {text}", flush=True)

    def fail(self, text: str, kind: str = "failures") -> None:
        setattr(self.summary, kind, getattr(self.summary, kind) + 1)
        self.details.append(f"seed={self.seed} cycle={self.cycle}: {text}")

    def chain_paths(self) -> list[Path]:
        assert self.top is not None
        return [layer.path for layer in chain_of(self.top)]

    # -- chain ----------------------------------------------------------------------

    def prepare_chain(self, rng: random.Random) -> None:
        changed = False
        if self.top is None or (self.chain_age >= CHAIN_LIFE and rng.random() < 0.5):
            self.top = self.builder.new_chain(rng, rng.randint(2, 4))
            self.summary.chains_built += 1
            self.chain_age = 0
            changed = True
            self.say(f"new chain: {[p.name for p in self.chain_paths()]}")
        else:
            layers = chain_of(self.top)
            add = 0
            if len(layers) == 1:
                add = rng.randint(1, 2)
            elif len(layers) < 4 and rng.random() < 0.25:
                add = 1
            for _ in range(add):
                fill = rng.random() < 0.5
                self.top = self.builder.add_layer(rng, self.top, layers[0].fmt, fill=fill)
                layers = chain_of(self.top)
                self.summary.layers_added += 1
                changed |= fill
            if add:
                self.say(f"chain now {[p.name for p in self.chain_paths()]}")
        self.chain_age += 1
        if changed or not self.ref:
            self.ref = guest_view(self.top, self.dir)

    # -- the daemon -------------------------------------------------------------------

    def start_daemon(self, copy_on_read: bool, engine_threads: bool = False) -> Served:
        assert self.top is not None
        try:
            self.served = Served(self.top, self.mount, self.qmp_path, self.serve_log,
                                 copy_on_read=copy_on_read, engine_threads=engine_threads)
        except StartError as e:
            self.fail(f"restart failed: {e}")
            raise Failure() from None
        self.summary.restarts += 1
        return self.served

    def check_through_mount(self, rng: random.Random, full: bool) -> None:
        """Reads through the fresh mount must give the reference."""
        assert self.served is not None
        size = len(self.ref)
        with open(self.served.drive, "rb", buffering=0) as f:
            if full:
                ranges = [(0, size)]
            else:
                ranges = []
                for _ in range(8):
                    length = rng.randint(1, 512 << 10)
                    ranges.append((rng.randint(0, size - length), length))
            for off, length in ranges:
                f.seek(off)
                got = b""
                while len(got) < length:
                    piece = f.read(length - len(got))
                    if not piece:
                        break
                    got += piece
                want = self.ref[off : off + length]
                if got != want:
                    at = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                              min(len(got), len(want)))
                    self.fail(f"read through the restarted mount differs at offset {off + at} "
                              f"(read [{off}, +{length}))", "mismatches")
                    raise Failure()
                self.summary.bytes_verified += length

    def stop_daemon(self, kind: str, qmp: QMP | None) -> None:
        srv = self.served
        assert srv is not None
        if kind in ("kill", "term+kill"):
            if kind == "term+kill":  # SIGKILL while the clean stop is under way
                srv.proc.send_signal(signal.SIGTERM)
                time.sleep(self.rng.uniform(0, 0.05))
            srv.kill()
            self.summary.sigkills += 1
            self.check_log(srv)
            return
        if kind == "quit" and qmp is not None:
            try:
                qmp.cmd("quit")
            except Exception:  # the connection closes as the daemon stops
                pass
            rc = srv.wait()
            self.summary.quits += 1
        else:
            rc = srv.terminate()
            self.summary.sigterms += 1
        if rc != 0:
            self.fail(f"clean stop ({kind}) exited with status {rc}: {srv.tail()}")
        if is_mounted(self.mount):
            self.fail(f"clean stop ({kind}) left the mount behind")
        self.check_log(srv)

    def check_log(self, srv: Served) -> None:
        errors = srv.errors()
        if errors:
            self.fail(f"the daemon logged {len(errors)} error(s): " + " | ".join(errors[:3]))

    # -- workers ----------------------------------------------------------------------

    def start_workers(self, rng: random.Random) -> None:
        size = len(self.ref)
        region = rng.choice([16 << 10, 64 << 10, 256 << 10])
        n = self.args.writers
        owner = [rng.randrange(n + 1) for _ in range(size // region)]  # n: nobody's
        for i in range(n):
            if i not in owner:
                owner[rng.randrange(len(owner))] = i
        regions = [[r * region, (r + 1) * region] for r in range(size // region)]
        (self.dir / "ref.raw").write_bytes(self.ref)
        self.workers = []
        for i in range(n):
            params = {
                "seed": rng.getrandbits(63), "path": str(self.mount / "d0"),
                "ref": str(self.dir / "ref.raw"),
                "owned": [g for g, o in zip(regions, owner, strict=True) if o == i],
                "unowned": [g for g, o in zip(regions, owner, strict=True) if o == n],
                "others": [g for g, o in zip(regions, owner, strict=True) if o not in (i, n)],
                "max_seconds": 600, "pace": self.args.pace,
            }
            self.workers.append(WorkerProc(i, params, self.worker_log))

    def collect_workers(self, t_stop: float) -> list[WorkerLog]:
        logs = []
        for w in self.workers:
            if not w.finish(timeout=60):
                self.fail(f"worker {w.log.index} still running 60 s after the daemon stopped")
            log = w.log
            logs.append(log)
            if log.error is not None and log.error[2] < t_stop:
                self.fail(f"worker {log.index}: I/O error while the daemon was serving: "
                          f"{log.error[3]} (after op {log.error[0]})")
            for text in log.read_mismatches:
                self.fail(f"worker {log.index}: {text}", "mismatches")
            if log.garbage:
                self.fail(f"worker {log.index} crashed or sent garbage: {log.garbage[:3]} "
                          f"(see {self.worker_log})")
            self.summary.bytes_written += log.bytes_acked()
            self.summary.bytes_verified += log.stats.get("bytes_read_checked", 0)
            self.summary.worker_ops += log.stats.get("ops", 0)
            self.summary.fsyncs += log.stats.get("fsyncs", 0)
            self.summary.punches += log.stats.get("punches", 0)
        self.workers = []
        return logs

    # -- checks -----------------------------------------------------------------------

    def check_images(self, killed: bool) -> None:
        """qemu-img check every qcow2 layer. Leaks are fine after a kill (and repaired).

        After a clean stop they are fine only beyond the end the file had when a kill
        was repaired: a killed daemon's allocation reserve may have refcounts past EOF,
        which qemu-img check neither sees nor repairs until the file grows over them.
        """
        assert self.top is not None
        for layer in chain_of(self.top):
            if layer.fmt != "qcow2":
                continue
            key = str(layer.path.resolve())
            rc, out, leaked = check(layer.path)
            carried = rc == 3 and not killed and key in self.eof_after_kill and all(
                c * layer.cluster >= self.eof_after_kill[key] for c in leaked)
            if rc == 3 and (killed or carried):
                self.summary.leaks_after_kill += 1
                rc, out, _ = check(layer.path, repair_leaks=True)
            if killed:
                size = layer.path.stat().st_size
                self.eof_after_kill[key] = min(self.eof_after_kill.get(key, size), size)
            if rc != 0:
                kind = "corruptions" if rc == 2 else "failures"
                what = "leaks after a clean stop" if rc == 3 else f"qemu-img check exit {rc}"
                self.fail(f"{layer.path.name}: {what}:\n{out[-1500:]}", kind)

    def verify_view(self, logs: list[WorkerLog], clean: bool) -> None:
        assert self.top is not None
        view = guest_view(self.top, self.dir)
        bad, nbytes = check_view(self.ref, view, logs, clean=clean)
        self.summary.bytes_verified += nbytes
        for m in bad:
            self.fail(f"offset {m.offset}: {m.text}", "mismatches")
        self.ref = view

    # -- cycles -----------------------------------------------------------------------

    def run_cycle(self, completion: bool) -> None:
        cseed = self.rng.getrandbits(63)
        rng = random.Random(cseed)
        self.prepare_chain(rng)
        chain = self.chain_paths()
        below = {p: sha(p) for p in chain[1:]}  # backing files: read-only to the daemon
        race = rng.random() < 0.35
        cor = rng.random() < 0.7
        threads = rng.random() < 0.3  # every engine call in a worker thread: more interleaving
        kind = rng.choices(["kill", "term+kill", "term", "quit"], [5, 1, 2, 2])[0]
        self.say(f"seed {cseed}: {len(chain)} layers, copy-on-read {cor}, threads {threads}, "
                 f"{'stream to the end, ' if completion else ''}"
                 f"{'(racing the stop) ' if completion and race else ''}then {kind}")
        srv = self.start_daemon(cor, threads)
        self.check_through_mount(rng, full=not cor and rng.random() < 0.3)
        qmp = QMP(self.qmp_path)
        ctl = StreamControl(qmp, rng, chain, self.sstats)
        self.start_workers(rng)
        streamed_to: list[Path] | None = None
        try:
            if completion and race:  # stop at a random point of a full-speed stream
                time.sleep(rng.uniform(0, 0.3))
                ctl.start(speed=0)
                time.sleep(rng.uniform(0, 0.6))
            elif completion:
                time.sleep(rng.uniform(0, 0.5))
                if ctl.run_to_end(timeout=300):
                    streamed_to = ctl.chain
                time.sleep(rng.uniform(0.1, 1.0))
            else:
                short = rng.random() < 0.15  # sometimes stop right after the start
                until = time.monotonic() + (rng.uniform(0.0, 0.3) if short else
                                            rng.uniform(0.5, self.args.max_cycle))
                while time.monotonic() < until and srv.alive():
                    time.sleep(rng.uniform(0.02, 0.4))
                    ctl.step()
            ctl.qmp.poll_events()
            ctl.handle_events()
        except Exception as e:  # the QMP connection broke: the daemon died?
            self.fail(f"QMP failed while serving: {e!r}; daemon log:\n{srv.tail()}")
        if not srv.alive():
            self.fail(f"the daemon died by itself (status {srv.proc.returncode}):\n{srv.tail()}")
        for text in ctl.failures:
            self.fail(text)
        t_stop = time.monotonic()
        self.stop_daemon(kind, qmp)
        qmp.close()
        logs = self.collect_workers(t_stop)
        killed = kind in ("kill", "term+kill")
        self.check_images(killed=killed)
        self.verify_view(logs, clean=not killed)
        for path, digest in below.items():
            if sha(path) != digest:
                self.fail(f"{path.name} changed: the daemon wrote to a backing file")
        if streamed_to is not None:
            on_disk = self.chain_paths()
            if [p.resolve() for p in on_disk] != [p.resolve() for p in streamed_to]:
                self.fail(f"after the completed stream the chain on disk is "
                          f"{[p.name for p in on_disk]}, expected {[p.name for p in streamed_to]}")
        if self.details:
            raise Failure()

    def final_stream(self) -> None:
        """Stream the current chain to its end, clean stop; the image must be the view."""
        self.cycle += 1
        self.say("final stream to the end")
        srv = self.start_daemon(copy_on_read=False)
        qmp = QMP(self.qmp_path)
        ctl = StreamControl(qmp, self.rng, self.chain_paths(), self.sstats)
        ok = len(ctl.chain) == 1 or ctl.run_to_end(timeout=600, whole=True)
        for text in ctl.failures:
            self.fail(text)
        self.stop_daemon("term", qmp)
        qmp.close()
        del srv
        if ok:
            layers = chain_of(self.top) if self.top else []
            if len(layers) != 1:
                self.fail(f"after the final stream the chain is {[lay.path.name for lay in layers]}")
        self.check_images(killed=False)
        self.verify_view([], clean=True)
        if self.details:
            raise Failure()

    def run(self, deadline: float) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            self.cycle = n
            self.run_cycle(completion=n % STREAM_EVERY == 0)
            self.summary.cycles = n
        self.final_stream()

    def cleanup(self) -> None:
        for w in self.workers:
            w.kill()
        if self.served is not None and self.served.alive():
            self.served.kill()
        force_unmount(self.mount)

    def finish_summary(self) -> None:
        s = self.summary
        s.streams_started = self.sstats.started
        s.streams_completed = self.sstats.completed
        s.streams_cancelled = self.sstats.cancelled
        s.stream_commands = self.sstats.commands


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (like 16M)") from None
    if n < (1 << 20) or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"'{text}': a whole number of MiB, at least 1M")
    return n


def print_summary(s: Summary, details: list[str], minutes: float) -> None:
    mib = 1 << 20
    print(f"""torture summary (seed {s.seed}, {s.seconds:.0f} s)
  cycles:            {s.cycles}
  kills survived:    {s.sigkills} SIGKILL, {s.sigterms} SIGTERM, {s.quits} QMP quit \
({s.restarts} daemon starts)
  chains:            {s.chains_built} built, {s.layers_added} layers added
  I/O:               {s.worker_ops} ops, {s.bytes_written / mib:.1f} MiB written, \
{s.fsyncs} fsyncs, {s.punches} hole punches
  verified:          {s.bytes_verified / mib:.1f} MiB
  streams:           {s.streams_started} started, {s.streams_completed} completed, \
{s.streams_cancelled} cancelled ({s.stream_commands} QMP commands)
  leaks after kill:  {s.leaks_after_kill} (repaired)
  mismatches:        {s.mismatches}
  corruptions:       {s.corruptions}
  other failures:    {s.failures}""", flush=True)
    if details:
        print("FAILED:")
        for d in details[:MAX_DETAILS]:
            print(f"  {d}")
        if len(details) > MAX_DETAILS:
            print(f"  ... and {len(details) - MAX_DETAILS} more")
        print(f"reproduce: scripts/torture --seed {s.seed} --minutes {minutes:g}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="run time (default 5)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--writers", type=int, default=3, help="I/O processes (default 3)")
    p.add_argument("--size", type=parse_size, default=16 << 20, help="drive size (default 16M)")
    p.add_argument("--max-cycle", type=float, default=4.0,
                   help="longest serving time of a cycle, seconds (default 4)")
    p.add_argument("--pace", type=float, default=0.002,
                   help="workers sleep up to this many seconds between ops (default 0.002)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch parent directory")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json", type=Path, default=None, help="write the summary as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    if args.minutes <= 0 or args.writers < 1:
        p.error("--minutes must be positive and --writers at least 1")
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    print(f"torture: seed {args.seed}, {args.minutes:g} min, {args.writers} writers", flush=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # also when started in the
        signal.signal(sig, on_signal)  # background, where SIGINT comes ignored
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vdisk-torture-", dir=args.workdir))
    t0 = time.monotonic()
    torture = Torture(args, workdir)
    interrupted = False
    try:
        torture.run(t0 + args.minutes * 60)
    except Failure:
        pass
    except (ToolError, OSError, subprocess.SubprocessError) as e:
        torture.fail(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        torture.cleanup()
        if args.keep or (torture.details and args.verbose):
            print(f"torture: scratch kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    torture.summary.seconds = time.monotonic() - t0
    torture.finish_summary()
    print_summary(torture.summary, torture.details, args.minutes)
    if args.json is not None:
        doc = asdict(torture.summary)
        doc["details"] = torture.details
        doc["interrupted"] = interrupted
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if interrupted:
        print("torture: interrupted", flush=True)
        return 130
    return 1 if torture.details else 0


if __name__ == "__main__":
    sys.exit(main())
