"""fio inside a small VM guest (qemu-system-x86_64 under TCG) on a virtio disk that is the
served file, opened with cache=none (aio=io_uring where QEMU can, else aio=threads).

The guest: Debian's kernel (the linux-image-amd64 package, fetched with `apt-get download`
and unpacked, never installed) and an initramfs built here: busybox (static), the host's
fio with the shared libraries ldd names, and the virtio modules. Both are cached (see
prepare()). A run appends a small second cpio archive holding /init (the fio commands of
that run) to the cached one: the kernel unpacks both. /init loads the modules, runs fio on
/dev/vda, writes each JSON result between markers to the second serial port (a file on the
host) and powers off.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bench_lib.fio import Job, fio_args, parse_fio

KERNEL_META = "linux-image-amd64"
MODULES = ("virtio_pci", "virtio_blk")
BUSYBOX = Path("/bin/busybox")
MEMORY_MIB = 512
BOOT_TIMEOUT = 300.0  # seconds from start to the first result marker (TCG, a shared machine)


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path  # the cached part (no /init)
    aio: str  # QEMU's aio= for the drive: io_uring where it works, else threads


# -- cpio (newc), as the kernel unpacks it --------------------------------------------------


class Cpio:
    """A newc cpio archive written to f; directories made before what they hold."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.ino = 1
        self.dirs: set[str] = {""}

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        self.f.write(head + b"\0" * (-len(head) % 4))
        self.f.write(data + b"\0" * (-len(data) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if name in self.dirs:
            return
        self.dir(name.rpartition("/")[0])
        self._entry(name, 0o040755)
        self.dirs.add(name)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        self.dir(name.rpartition("/")[0])
        self._entry(name, 0o100000 | mode, data)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


# -- the kernel and the cached initramfs ----------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-800:]}")
    return res.stdout


def kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on (e.g. linux-image-6.1.0-57-amd64)."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"Depends: (linux-image-\S+)", out)
    if m is None:
        raise RuntimeError(f"apt-cache depends {KERNEL_META}: no linux-image dependency")
    return m.group(1)


def fetch_kernel(cache: Path, say: Callable[[str], None]) -> Path:
    """The unpacked kernel package in cache (downloaded once): its root directory."""
    pkg = kernel_package()
    root = cache / pkg
    if (root / ".done").exists():
        return root
    say(f"guest: fetching {pkg} (apt-get download, about 70 MB; unpacked, not installed)")
    dl = cache / "download"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir(parents=True)
    try:
        _run(["apt-get", "download", "-q", pkg], cwd=dl)
    except RuntimeError:  # stale package lists: refresh them once (needs root)
        _run(["apt-get", "update", "-q"])
        _run(["apt-get", "download", "-q", pkg], cwd=dl)
    debs = list(dl.glob("*.deb"))
    shutil.rmtree(root, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    shutil.rmtree(dl)
    (root / ".done").touch()
    return root


def _modinfo_depends(ko: Path) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def modules_in_order(moddir: Path, names: tuple[str, ...]) -> list[Path]:
    """The .ko files of names and of what they depend on, each after its dependencies
    (modules built into the kernel are left out)."""
    builtin = {Path(line).stem.replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().split()}
    files = {p.stem.replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []

    def add(name: str) -> None:
        name = name.replace("-", "_")
        if name in builtin or files.get(name) in order:
            return
        if name not in files:
            raise RuntimeError(f"guest: no module {name} in {moddir}")
        for dep in _modinfo_depends(files[name]):
            add(dep)
        order.append(files[name])

    for n in names:
        add(n)
    return order


def fio_files() -> list[str]:
    """The host's fio and every shared library it loads (with the dynamic loader)."""
    fio = shutil.which("fio")
    if fio is None:
        raise RuntimeError("fio is not installed")
    out = _run(["ldd", fio])
    libs = re.findall(r"=> (/\S+)", out) + re.findall(r"^\s*(/\S+) \(", out, re.MULTILINE)
    return [fio, *dict.fromkeys(libs)]


def build_initramfs(path: Path, moddir: Path) -> None:
    """The cached initramfs: busybox, fio and its libraries, the modules and their order."""
    mods = modules_in_order(moddir, MODULES)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        c = Cpio(f)
        for d in ("bin", "dev", "proc", "sys", "tmp", "modules"):
            c.dir(d)
        c.file("bin/busybox", BUSYBOX.read_bytes())
        fio, *libs = fio_files()
        c.file("bin/fio", Path(fio).read_bytes())
        for lib in libs:
            c.file(lib, Path(lib).read_bytes())  # at the path ldd names (RUNPATHs hold)
        for ko in mods:
            c.file(f"modules/{ko.name}", ko.read_bytes(), 0o644)
        c.file("modules/order", "".join(f"{ko.name}\n" for ko in mods).encode(), 0o644)
        c.close()
    tmp.replace(path)


def prepare(cache: Path, say: Callable[[str], None]) -> GuestImage:
    """The guest's kernel and cached initramfs, made once under cache. The initramfs is
    rebuilt when busybox, fio or its libraries, or this file change."""
    if shutil.which("qemu-system-x86_64") is None or not BUSYBOX.exists():
        raise RuntimeError("the VM guest needs qemu-system-x86_64 and busybox "
                           "(qemu-system-x86, busybox-static: scripts/bench installs them)")
    cache.mkdir(parents=True, exist_ok=True)
    root = fetch_kernel(cache, say)
    (kernel,) = sorted((root / "boot").glob("vmlinuz-*"))
    moddir = root / "lib" / "modules" / kernel.name.removeprefix("vmlinuz-")
    h = hashlib.sha256(Path(__file__).read_bytes())
    for p in [str(BUSYBOX), *fio_files()]:
        st = Path(p).stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    initramfs = cache / f"initramfs-{kernel.name.removeprefix('vmlinuz-')}-{h.hexdigest()[:12]}.cpio"
    if not initramfs.exists():
        say("guest: building the initramfs (busybox, fio and its libraries, virtio modules)")
        for old in cache.glob("initramfs-*.cpio"):
            old.unlink()
        build_initramfs(initramfs, moddir)
    return GuestImage(kernel, initramfs, "io_uring" if io_uring_works(cache) else "threads")


def io_uring_works(cache: Path) -> bool:
    """QEMU opens a cache=none drive with aio=io_uring here (not built in, or io_uring
    disabled by the kernel: no)."""
    probe = cache / "probe.raw"
    probe.write_bytes(b"\0" * 4096)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
           "-monitor", "stdio", "-drive",
           f"file={probe},format=raw,if=virtio,cache=none,aio=io_uring"]
    try:
        res = subprocess.run(cmd, input="quit\n", capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    finally:
        probe.unlink()
    return res.returncode == 0


# -- one run ----------------------------------------------------------------------------


def init_script(jobs: list[Job], runtime: float, ramp: float) -> str:
    """/init: modules, wait for /dev/vda, each fio job's JSON to ttyS1 between markers."""
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox --install -s /bin; export PATH=/bin",
        "mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev",
        "echo 1 > /proc/sys/kernel/printk",
        "for m in $(cat /modules/order); do insmod /modules/$m || echo \"insmod $m failed\"; done",
        "out=/dev/ttyS1; stty -F $out raw -echo",
        "i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done",
        "if [ ! -b /dev/vda ]; then echo '@@error no /dev/vda' > $out; poweroff -f; fi",
        "echo @@ready > $out",
    ]
    for job in jobs:
        cmd = shlex.join(fio_args(job, "/dev/vda", runtime=runtime, ramp=ramp))
        lines += [f"{cmd} --output=/tmp/{job.name}.json > /tmp/{job.name}.err 2>&1",
                  "rc=$?",
                  f"echo '@@begin {job.name}' > $out",
                  f"cat /tmp/{job.name}.json /tmp/{job.name}.err > $out",
                  f"echo \"@@end {job.name} $rc\" > $out"]
    lines += ["echo @@done > $out", "sync", "poweroff -f", ""]
    return "\n".join(lines)


def _results(text: str) -> Iterator[tuple[str, int, str]]:
    for m in re.finditer(r"@@begin (\S+)\r?\n(.*?)@@end \1 (\d+)", text, re.DOTALL):
        yield m.group(1), int(m.group(3)), m.group(2)


def qemu_command(image: GuestImage, initrd: Path, drive: Path, console: Path,
                 results: Path) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-cpu", "max",
            "-smp", "1", "-m", str(MEMORY_MIB), "-nodefaults", "-display", "none",
            "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
            "-serial", f"file:{console}", "-serial", f"file:{results}",
            "-drive", f"file={drive},format=raw,if=virtio,cache=none,aio={image.aio}"]


def run_guest(image: GuestImage, drive: Path, jobs: list[Job], *, runtime: float, ramp: float,
              work: Path, log: Path | None = None) -> dict[str, dict[str, Any]]:
    """Boot the guest on drive, run jobs in it; each job's figures (as run_fio's)."""
    work.mkdir(parents=True, exist_ok=True)
    initrd = work / "initrd.cpio"
    shutil.copyfile(image.initramfs, initrd)
    with open(initrd, "ab") as f:
        c = Cpio(f)
        c.file("init", init_script(jobs, runtime, ramp).encode())
        c.close()
    console, results = work / "console.log", work / "results.log"
    cmd = qemu_command(image, initrd, drive, console, results)
    timeout = BOOT_TIMEOUT + len(jobs) * (runtime + ramp + 60)
    t0 = time.monotonic()
    with open(work / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = results.read_text(errors="replace") if results.exists() else ""
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n(exit {rc}, {time.monotonic() - t0:.1f} s)\n"
                    f"{text}\n")
    out: dict[str, dict[str, Any]] = {}
    for name, status, body in _results(text):
        if status != 0:
            raise RuntimeError(f"guest: fio {name} failed ({status}): {body.strip()[-800:]}")
        out[name] = parse_fio(body, f"guest fio {name}")
    missing = [j.name for j in jobs if j.name not in out]
    if missing or "@@done" not in text:
        why = "timed out" if rc is None else f"exited {rc}"
        tail = "\n".join(console.read_text(errors="replace").splitlines()[-15:]) \
            if console.exists() else ""
        qemu_err = (work / "qemu.log").read_text(errors="replace").strip()[-500:]
        raise RuntimeError(f"guest: qemu {why} without the results of {', '.join(missing)}: "
                           f"{qemu_err}\n{text.strip()[-500:]}\nconsole:\n{tail}")
    return out
