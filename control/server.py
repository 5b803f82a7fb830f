"""The trio layer of the QMP server: moves bytes between sockets and the sans-IO core.

One task group per client: a reader feeding requests (in order) to a processor that runs
the commands one after the other, a writer draining a bounded outgoing queue, and an event
forwarder. A client is dropped when its outgoing queue (in messages or bytes) or its event
subscription is full, so a client that never reads cannot block the daemon, the event bus or
other clients, nor make it hold more than a few MiB for it.
Sessions are shielded from the server's cancellation: on stop, each stops reading and gets
`ServerConfig.close_grace` seconds to write what is already queued (answers, SHUTDOWN).
The socket itself, and who may connect to it, is control.unix_socket's business.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

import trio

from control.backend import Backend
from control.builtin import CAPABILITIES, version_info
from control.errors import QMPError
from control.events import EventBus
from control.protocol import DEFAULT_MAX_MESSAGE_SIZE, Connection, Event, InputError, Request
from control.registry import Context, Registry
from control.unix_socket import bind_socket, peer_allowed, peer_credentials, remove_if_ours

log = logging.getLogger(__name__)

RECEIVE_SIZE = 65536
DEFAULT_OUTGOING_QUEUE = 256  # messages queued for one client before it is dropped
DEFAULT_OUTGOING_BYTES = 8 << 20  # bytes queued for one client before it is dropped
DEFAULT_PENDING_REQUESTS = 32  # parsed requests of one client waiting to run
AFTER_REPLY_WAIT = 2.0  # seconds to wait for an answer to be written before its hooks run
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class ServerConfig:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    outgoing_queue: int = DEFAULT_OUTGOING_QUEUE
    outgoing_bytes: int = DEFAULT_OUTGOING_BYTES  # one message alone may exceed it
    pending_requests: int = DEFAULT_PENDING_REQUESTS
    event_buffer: int = DEFAULT_OUTGOING_QUEUE
    close_grace: float = 1.0  # seconds to flush queued output when the server stops


_Out = tuple[bytes, trio.Event | None]


class _Session:
    """One client connection."""

    def __init__(self, stream: trio.SocketStream, label: str, server: _Server) -> None:
        self.stream = stream
        self.label = label
        self.server = server
        config = server.config
        self.conn = Connection(max_message_size=config.max_message_size)
        self.out_send, self.out_recv = trio.open_memory_channel[_Out](config.outgoing_queue)
        self.req_send, self.req_recv = trio.open_memory_channel[Request | InputError](
            config.pending_requests
        )
        self.queued_bytes = 0  # in the outgoing queue, not yet written
        self.scope = trio.CancelScope()  # the whole connection
        self.inputs_scope = trio.CancelScope()  # reading, running commands, taking events

    def drop(self, why: str) -> None:
        log.warning("QMP client %s dropped: %s", self.label, why)
        self.scope.cancel()

    def shutdown(self, grace: float) -> None:
        """Stop reading; write what is queued for at most `grace` seconds, then close."""
        self.inputs_scope.cancel()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + grace)

    def enqueue(self, data: bytes, done: trio.Event | None = None) -> bool:
        """Queue one message; a full queue drops the client. Never blocks."""
        if self.queued_bytes and self.queued_bytes + len(data) > self.server.config.outgoing_bytes:
            self.drop("outgoing queue full (client does not read)")
            return False
        try:
            self.out_send.send_nowait((data, done))
            self.queued_bytes += len(data)
            return True
        except trio.WouldBlock:
            self.drop("outgoing queue full (client does not read)")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    async def run(self) -> None:
        events = self.server.events
        with self.scope, events.subscribe(self.server.config.event_buffer) as event_recv:
            self.enqueue(self.conn.send_greeting(version_info(), CAPABILITIES))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.writer)
                nursery.start_soon(self.inputs, event_recv)

    async def inputs(self, event_recv: trio.MemoryReceiveChannel[Event]) -> None:
        """Reader, processor and event forwarder; when they stop, the queue is closed."""
        try:
            with self.inputs_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.reader)
                    nursery.start_soon(self.forward_events, event_recv)
                    await self.processor()
                    nursery.cancel_scope.cancel()
        finally:
            self.take_pending_events(event_recv)
            self.out_send.close()  # the writer drains the queue, then ends the connection

    async def reader(self) -> None:
        async with self.req_send:
            while not self.conn.broken:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                for item in self.conn.receive_data(data):
                    await self.req_send.send(item)

    async def processor(self) -> None:
        """Answer requests one after the other, until EOF or a fatal input error."""
        async for item in self.req_recv:
            if isinstance(item, InputError):
                self.enqueue(self.conn.send_error(item.error, item.id))
                if item.fatal:
                    return
                continue
            refusal = self.conn.admit(item)
            if refusal is not None:
                self.enqueue(self.conn.send_error(refusal, item.id))
                continue
            await self.run_command(item)

    async def run_command(self, request: Request) -> None:
        server = self.server
        ctx = Context(server.backend, server.events, server.registry, client=self.label)
        try:
            result = await server.registry.execute(ctx, request.name, request.arguments)
            data = self.conn.send_return(request, result)
        except QMPError as e:
            data = self.conn.send_error(e, request.id)
        if not ctx.after_reply:
            self.enqueue(data)
            return
        done = trio.Event()
        try:
            if self.enqueue(data, done):
                with trio.move_on_after(AFTER_REPLY_WAIT):
                    await done.wait()
        finally:
            for hook in ctx.after_reply:
                hook()

    async def writer(self) -> None:
        async with self.out_recv:
            async for data, done in self.out_recv:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # the client went away (after `quit`, say): normal, not a warning
                    log.debug("QMP client %s: connection lost while writing", self.label)
                    self.scope.cancel()
                    return
                self.queued_bytes -= len(data)
                if done is not None:
                    done.set()
        # Inputs stopped (EOF, fatal input error, shutdown) and everything was written.
        self.scope.cancel()

    async def forward_events(self, event_recv: trio.MemoryReceiveChannel[Event]) -> None:
        async for event in event_recv:
            data = self.conn.send_event(event)
            if data is not None:
                self.enqueue(data)
        self.drop("too many undelivered events")

    def take_pending_events(self, event_recv: trio.MemoryReceiveChannel[Event]) -> None:
        """Queue events already emitted (e.g. SHUTDOWN just before the server stops)."""
        while True:
            try:
                event = event_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            data = self.conn.send_event(event)
            if data is not None and not self.enqueue(data):
                return


@dataclass
class _Server:
    registry: Registry
    backend: Backend
    events: EventBus
    config: ServerConfig
    sessions: set[_Session] = field(default_factory=set)
    closing: bool = False

    def close_sessions(self) -> None:
        self.closing = True
        for session in list(self.sessions):
            session.shutdown(self.config.close_grace)


async def _serve_client(stream: trio.SocketStream, server: _Server) -> None:
    try:
        if server.closing:
            return
        try:
            pid, uid, _gid = peer_credentials(stream.socket)
        except OSError as e:
            log.warning("QMP: cannot read peer credentials: %s", e)
            return
        if not peer_allowed(uid):
            log.warning("QMP: refused client pid %d uid %d", pid, uid)
            return
        label = f"pid {pid} uid {uid}"
        session = _Session(stream, label, server)
        server.sessions.add(session)  # no checkpoint since the `closing` check
        log.info("QMP client %s connected", label)
        try:
            # Shielded: on server shutdown, close_sessions() lets queued answers and
            # events (SHUTDOWN, ...) go out for up to close_grace seconds.
            with trio.CancelScope(shield=True):
                await session.run()
        except Exception:  # a bug must cost one connection, not the server
            log.exception("QMP client %s: internal error; connection closed", label)
        finally:
            server.sessions.discard(session)
            log.info("QMP client %s disconnected", label)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_qmp(
    socket_path: str,
    registry: Registry,
    backend: Backend,
    events: EventBus,
    *,
    config: ServerConfig | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve QMP on a UNIX socket until cancelled; started() once listening.

    On cancel the socket file is removed at once, each connection gets up to
    `config.close_grace` seconds to write what was already queued for it (answers,
    events emitted just before), then every connection is closed.
    """
    config = config or ServerConfig()
    path = os.path.abspath(socket_path)
    sock = await bind_socket(path)
    st = os.stat(path)
    identity = (st.st_dev, st.st_ino)
    listener = trio.SocketListener(sock)
    server = _Server(registry, backend, events, config)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            try:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:
                        if e.errno not in _ACCEPT_RETRY_ERRNOS:
                            raise
                        log.error("QMP accept failed: %s; retrying", e)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(_serve_client, stream, server)
            finally:
                sock.close()
                remove_if_ours(path, identity)
                server.close_sessions()
    finally:
        sock.close()
        remove_if_ours(path, identity)
