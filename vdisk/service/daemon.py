"""The `vdisk serve` daemon: FUSE and the QMP server in one trio run.

Lifecycle: prepare the mount point (clear a stale vdisk mount), open every chain (locks
taken), mount, run FUSE, then listen on the QMP socket (it appears only once the mount
is live), call `on_ready` (the pid file, a daemonizing parent's readiness pipe), and serve
until SIGTERM, SIGINT, SIGHUP, QMP `quit` or an external unmount. SIGUSR1 calls
`on_reopen` (the log file is reopened, for logrotate).
Stopping: cancel block jobs, let in-flight FUSE requests finish, flush every drive, stop
QMP, unmount, close the chains (locks released); the socket file is removed.

The daemon is the QMP backend: `drives()`, `request_quit()`, `block_device(id)`, `jobs`
(the JobManager), `spawn(fn)` (background tasks such as block jobs, cancelled before the
final flush), `events` (the EventBus) and `nodes` (every image's node name,
control.nodes). With ServeConfig.metrics it also serves the drives' I/O counters
(vdisk.service.metrics) on the same loop.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from control.bitmaps import register_bitmaps
from control.block_jobs import register_block_jobs
from control.blockinfo import block_info
from control.builtin import make_registry
from control.events import EventBus
from control.jobs import JobManager
from control.nodes import NodeNames, register_nodes
from control.qapi_schema import register_qapi_schema
from control.server import serve_qmp
from control.stats import register_stats
from control.unix_socket import bind_socket
from vdisk.block import loop_guard
from vdisk.block.device import BlockDevice
from vdisk.engine.chain import close_chain, iter_chain, open_chain
from vdisk.engine.image import Image
from vdisk.errors import ImageError, VdiskError
from vdisk.fuse import fastpath
from vdisk.fuse import hook as fuse_hook
from vdisk.fuse.fs import DriveFS, mount_options
from vdisk.service.memory import release_unused
from vdisk.service.metrics import Address, serve_metrics
from vdisk.service.mounts import (
    prepare_mountpoint,
    remove_created,
    resolve_mountpoint,
    set_readahead,
)

log = logging.getLogger("vdisk")

FUSE_MIN_TASKS = 4
FUSE_MAX_TASKS = 32
MOUNT_TIMEOUT = 10.0
STOP_HOOK_TIMEOUT = 30.0
READAHEAD_KIB = 1024  # kernel readahead for the mount (FUSE's default is 128 KiB)


@dataclass(frozen=True)
class DriveSpec:
    """One --drive option."""

    id: str
    file: str
    format: str | None = None
    copy_on_read: bool | None = None  # None: on for read-write drives
    read_only: bool = False
    backing_owner_check: bool = True  # refuse backing files the image owners cannot read
    # given node names: (depth, protocol node?, name), e.g. (1, False, "mid") from
    # backing.node-name=mid (control.nodes; the others are made up)
    node_names: tuple[tuple[int, bool, str], ...] = ()


@dataclass(frozen=True)
class ServeConfig:
    mount: str
    qmp: str
    drives: tuple[DriveSpec, ...]
    allow_other: bool = False
    engine_threads: bool = False  # run every engine call in a worker thread (measurements)
    metrics: Address | None = None  # --metrics: (host, port) or a UNIX socket path


@dataclass
class Drive:
    """A served drive: its options and its block device (the QMP DriveView)."""

    spec: DriveSpec
    device: BlockDevice
    nodes: NodeNames

    @property
    def id(self) -> str:
        return self.spec.id

    def query_block(self) -> dict[str, Any]:
        top = self.device.top
        return block_info(self.spec.id, top, self.device.read_only, self.nodes.name(top))


def _single(exc: BaseException) -> BaseException:
    """The one interesting exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if len(inner) != 1:
            break
        exc = inner[0]
    return exc


def _job_event_logger(emit: Callable[[str, dict[str, Any]], object]
                      ) -> Callable[[str, dict[str, Any]], None]:
    """emit, logging the end of every block job (and its errors) with its figures."""

    def logged(name: str, data: dict[str, Any]) -> None:
        where = f"{data.get('offset', 0)}/{data.get('len', 0)} bytes"
        job = data.get("device", "?")
        if name == "BLOCK_JOB_COMPLETED" and "error" in data:
            log.error("job %s: ended with an error at %s: %s", job, where, data["error"])
        elif name == "BLOCK_JOB_COMPLETED":
            log.info("job %s: completed at %s", job, where)
        elif name == "BLOCK_JOB_CANCELLED":
            log.info("job %s: cancelled at %s", job, where)
        elif name == "BLOCK_JOB_ERROR":
            log.warning("job %s: %s error, action %s", job, data.get("operation"),
                        data.get("action"))
        emit(name, data)

    return logged


class Daemon:
    def __init__(
        self,
        config: ServeConfig,
        on_ready: Callable[[], None] | None = None,
        on_reopen: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.on_ready = on_ready
        self.on_reopen = on_reopen
        self.mount = resolve_mountpoint(config.mount)  # resolved now: never stat it once mounted
        self.qmp_path = os.path.abspath(config.qmp)
        self._drives: dict[str, Drive] = {}
        self.events = EventBus()
        self.registry = make_registry()
        register_block_jobs(self.registry)
        register_bitmaps(self.registry)
        register_nodes(self.registry)
        register_stats(self.registry)
        register_qapi_schema(self.registry)
        self.nodes = NodeNames()  # every image's node name (control.nodes)
        self.jobs = JobManager(_job_event_logger(self.events.emit), self.spawn)
        self.nursery: trio.Nursery | None = None  # background tasks (block jobs)
        self.stop_hooks: list[Callable[[], Awaitable[None]]] = [self.jobs.cancel_all]
        self._quit = trio.Event()
        self._quit_reason = "host-qmp-quit"
        self._quit_why = ""  # what happened, for the log, when the reason does not say it
        self._jobs_scope = trio.CancelScope()
        self._qmp_scope = trio.CancelScope()
        self._metrics_scope = trio.CancelScope()
        self._fuse_done = trio.Event()
        self._jobs_done = trio.Event()
        self.failed = False
        self._served = False  # the mount was live and every drive announced
        self._ops: DriveFS

    # -- backend API (control.backend.Backend and the block job commands) ----------

    def drives(self) -> Mapping[str, Drive]:
        return self._drives

    def block_device(self, drive_id: str) -> BlockDevice | None:
        drive = self._drives.get(drive_id)
        return drive.device if drive is not None else None

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run fn in the background; such tasks are cancelled first when the daemon stops."""
        if self.nursery is None:
            raise RuntimeError("the daemon is not running")
        self.nursery.start_soon(fn)

    def request_quit(self, reason: str = "host-qmp-quit", why: str = "") -> None:
        """Stop; reason is the SHUTDOWN event's (QEMU's ShutdownCause), why says in the
        log what happened when the reason alone does not."""
        if not self._quit.is_set():
            self._quit_reason = reason
            self._quit_why = why
            self._quit.set()

    # -- start-up ------------------------------------------------------------------

    def _open_drives(self) -> None:
        try:
            for spec in self.config.drives:
                top = _open_drive_chain(spec)
                cor = (not spec.read_only) if spec.copy_on_read is None else spec.copy_on_read
                device = BlockDevice(
                    spec.id, top, copy_on_read=cor, read_only=spec.read_only,
                    engine_threads=self.config.engine_threads,
                )
                self._drives[spec.id] = Drive(spec, device, self.nodes)
        except BaseException:
            self._close_drives_sync()
            raise

    def _name_nodes(self) -> None:
        """Give every image of every chain its node name (control.nodes)."""
        ids = set(self._drives)
        for drive in self._drives.values():
            given = {(depth, protocol): name
                     for depth, protocol, name in drive.spec.node_names}
            self.nodes.add_drive(drive.id, drive.device, given, reserved=ids)

    def _close_drives_sync(self) -> None:
        for drive in self._drives.values():
            try:
                close_chain(drive.device.top)
            except OSError as e:
                log.error("%s: close failed: %s", drive.id, e)
        self._drives.clear()

    # -- tasks ---------------------------------------------------------------------

    async def _fuse(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as aux:  # fallocate and lseek requests run here
                fuse_hook.set_handler(self._ops.fallocate, aux.start_soon, self._ops.lseek)
                task_status.started()
                try:
                    await pyfuse3.main(FUSE_MIN_TASKS, FUSE_MAX_TASKS)
                finally:
                    fuse_hook.set_handler(None, None)
        finally:
            self._fuse_done.set()
        if not self._quit.is_set() and self._ops.initialized.is_set():
            self.request_quit("host-signal", f"the mount at {self.mount} was unmounted from "
                              "outside")

    async def _wait_mounted(self) -> None:
        """Wait for the kernel's INIT handshake, or fail if FUSE stopped first."""
        with trio.move_on_after(MOUNT_TIMEOUT):
            async with trio.open_nursery() as n:
                async def fuse_ended() -> None:
                    await self._fuse_done.wait()
                    n.cancel_scope.cancel()

                async def initialized() -> None:
                    await self._ops.initialized.wait()
                    n.cancel_scope.cancel()

                n.start_soon(fuse_ended)
                n.start_soon(initialized)
        if not self._ops.initialized.is_set():
            raise VdiskError(f"{self.mount}: the FUSE mount did not come up")

    async def _background(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._jobs_scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self.nursery = None
            self._jobs_done.set()

    async def _qmp(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._qmp_scope:
            await serve_qmp(
                self.qmp_path, self.registry, self, self.events, task_status=task_status
            )

    async def _metrics(self, address: Address,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._metrics_scope:  # stops with the QMP server
            await serve_metrics(
                address, lambda: [(d.id, d.device.stats) for d in self._drives.values()],
                bind_socket, task_status=task_status,
            )

    async def _signals(self, receiver: Any) -> None:
        async for signum in receiver:
            name = signal.Signals(signum).name
            if signum == signal.SIGUSR1:
                log.info("SIGUSR1 received: reopening the log file")
                if self.on_reopen is not None:
                    try:
                        self.on_reopen()
                    except Exception as e:  # e.g. the log directory is gone
                        log.error("cannot reopen the log file: %s", e)
            elif self._quit.is_set():
                log.info("%s: already stopping", name)
            else:
                log.info("%s received: stopping", name)
                self.request_quit("host-signal")

    # -- run -----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until asked to stop; raise VdiskError/OSError for start-up problems."""
        qmp_dir = os.path.realpath(os.path.dirname(self.qmp_path))
        if os.path.commonpath([qmp_dir, self.mount]) == self.mount:
            raise VdiskError(f"{self.qmp_path}: the QMP socket cannot be inside the mount point")
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with trio.open_signal_receiver(*signals) as receiver:
            created = prepare_mountpoint(self.mount)
            try:
                await self._run(receiver)
            except BaseException:
                if not self._served:
                    remove_created(created)  # a failed start leaves no directory behind
                raise
        if self.failed:
            raise VdiskError("stopped with errors (see above)")
        log.info("stopped")

    async def _run(self, receiver: Any) -> None:
        """Open, mount and serve until asked to stop (run without the mount point set-up)."""
        await trio.to_thread.run_sync(self._open_drives)  # may sync, or connect to servers
        mounted = False
        try:
            self._name_nodes()
            fuse_hook.install()
            fast = fastpath.install()
            self._ops = DriveFS({d.id: d.device for d in self._drives.values()})
            if fast:
                fastpath.begin_mount()
                for inode, device in self._ops.devices():
                    table = fastpath.table_for(inode, device.size, device.top.cluster_size)
                    if table is not None:
                        device.attach_table(table)
            try:
                pyfuse3.init(self._ops, self.mount, mount_options(
                    allow_other=self.config.allow_other))
            except RuntimeError as e:
                raise VdiskError(f"{self.mount}: cannot mount: {e}") from None
            mounted = True
            try:
                async with trio.open_nursery() as root:
                    root.start_soon(self._signals, receiver)
                    await root.start(self._fuse)
                    await self._wait_mounted()
                    await trio.to_thread.run_sync(set_readahead, self.mount, READAHEAD_KIB)
                    await root.start(self._background)
                    await root.start(self._qmp)
                    if self.config.metrics is not None:
                        await root.start(self._metrics, self.config.metrics)
                    log.info(
                        "serving %s at %s, QMP at %s", ", ".join(self._drives) or "no drives",
                        self.mount, self.qmp_path,
                    )
                    log.info("FUSE fast path %s", f"on ({fastpath.FAST_THREADS} reader "
                             "threads)" if fast else "off: every request is served in Python")
                    for drive in self._drives.values():
                        log.info("%s", describe_drive(drive))
                        for note in probe_notes(drive):
                            log.warning("%s", note)
                    if self.on_ready is not None and not self._quit.is_set():
                        try:
                            self.on_ready()
                        except Exception as e:  # e.g. the pid file cannot be written
                            log.error("%s", e)
                            self.failed = True
                            self.request_quit("host-error")
                    self._served = not self.failed
                    release_unused()
                    await self._quit.wait()
                    await self._stop()
                    root.cancel_scope.cancel()
            except BaseExceptionGroup as eg:
                raise _single(eg) from None
        finally:
            if mounted:
                pyfuse3.close(unmount=True)
            await self._close_drives()

    async def _stop(self) -> None:
        log.info("stopping: %s", self._quit_why or self._quit_reason)
        self.events.emit("SHUTDOWN", {"guest": False, "reason": self._quit_reason})
        for hook in self.stop_hooks:  # e.g. cancel block jobs, which emit their events
            try:
                with trio.move_on_after(STOP_HOOK_TIMEOUT) as scope:
                    await hook()
                if scope.cancelled_caught:
                    log.error("stop hook %s timed out", getattr(hook, "__qualname__", hook))
            except Exception:
                log.exception("stop hook failed")
        self._jobs_scope.cancel()  # whatever is left in the background
        await self._jobs_done.wait()
        pyfuse3.terminate()  # in-flight requests finish, no new ones are read
        await self._fuse_done.wait()
        for drive in self._drives.values():
            try:
                await drive.device.flush()
            except OSError as e:
                self.failed = True
                log.error("%s: flush failed: %s", drive.id, e)
        self._qmp_scope.cancel()
        self._metrics_scope.cancel()

    async def _close_drives(self) -> None:
        for drive in self._drives.values():
            try:
                await drive.device.close()
            except OSError as e:
                self.failed = True
                log.error("%s: close failed: %s", drive.id, e)
        self._drives.clear()


READ_ONLY_HINT = "give read-only=on to serve it read-only"


def _open_drive_chain(spec: DriveSpec) -> Image:
    """open_chain for a drive; a top image that cannot be opened for writing (EROFS, or
    EACCES while reading would work) gets the hint to serve it read-only."""
    try:
        return open_chain(spec.file, fmt=spec.format, read_only=spec.read_only,
                          backing_owner_check=spec.backing_owner_check,
                          format_hint="give format=raw to serve it as raw")
    except ImageError as e:
        path = os.path.abspath(spec.file)
        if spec.read_only or e.path != path or not e.reason.startswith("cannot open"):
            raise
        if _open_errno(path, os.O_RDWR) in (errno.EROFS, errno.EACCES) and (
                _open_errno(path, os.O_RDONLY) is None):
            raise ImageError(path, f"{e.reason}; {READ_ONLY_HINT}") from None
        raise


def _open_errno(path: str, flags: int) -> int | None:
    """The errno of opening path with flags, or None if it opens (it is closed again)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        return e.errno
    os.close(fd)
    return None


def describe_drive(drive: Drive) -> str:
    """One log line on a served drive: image, format, size, chain depth, options."""
    device, depth, img = drive.device, 0, drive.device.top.backing
    while img is not None:
        depth, img = depth + 1, img.backing
    return (
        f"drive {drive.id}: {drive.spec.file} ({device.top.format_name}, {device.size} bytes, "
        f"{depth} backing image{'s' if depth != 1 else ''}, "
        f"{'read-only' if device.read_only else 'read-write'}, "
        f"copy-on-read {'on' if device.copy_on_read else 'off'}, "
        f"format {'probed' if device.top.probed else 'given'}"
        f"{'' if drive.spec.backing_owner_check else ', backing-owner-check off'})"
    )


def probe_notes(drive: Drive) -> list[str]:
    """Warnings on the images of a drive whose format was probed, not given."""
    notes = []
    top = drive.device.top
    if top.probed and top.format_name == "raw" and not drive.device.read_only:
        notes.append(
            f"drive {drive.id}: no format given and {top.path} probed as raw: writes that "
            "would make its first sector look like another format's header are refused "
            "(give format=raw to lift this)"
        )
    for img in list(iter_chain(top))[1:]:
        if img.probed:
            notes.append(
                f"drive {drive.id}: backing file {img.path} probed as {img.format_name}: its "
                "overlay does not name its format (qemu-img rebase -u -F FMT can record it)"
            )
    return notes


def serve(
    config: ServeConfig,
    on_ready: Callable[[], None] | None = None,
    on_reopen: Callable[[], None] | None = None,
) -> None:
    """Run the daemon to completion (blocks); errors as VdiskError/OSError. on_ready is
    called once the mount is live and QMP listens; on_reopen on SIGUSR1."""
    loop_guard.install()
    trio.run(Daemon(config, on_ready, on_reopen).run)
