"""The guard that keeps blocking engine calls off the trio thread.

`install()` hooks vdisk.engine.blocking: a sync or a large copy attempted on a thread
that runs a trio loop is a bug (it would stall QMP, every drive and every request).
Mode "raise" (the test suite: VDISK_LOOP_GUARD=raise) raises BlockingOnLoopError and
appends the stack to VDISK_LOOP_GUARD_LOG when that is set, so a test session can fail
on it even when the call happened in a daemon subprocess; mode "log" logs it once per
call site; "off" removes the hook.
"""

from __future__ import annotations

import logging
import os
import traceback

import trio

from vdisk.engine import blocking

log = logging.getLogger("vdisk.loop_guard")

ENV_MODE = "VDISK_LOOP_GUARD"
ENV_LOG = "VDISK_LOOP_GUARD_LOG"
MODES = ("off", "log", "raise")


class BlockingOnLoopError(RuntimeError):
    """A call that may sleep on the disk ran on the event-loop thread."""


def _report(what: str) -> str:
    stack = "".join(traceback.format_stack(limit=40)[:-2])
    text = f"blocking call on the event-loop thread: {what}\n{stack}"
    path = os.environ.get(ENV_LOG)
    if path:
        with open(path, "a") as f:
            f.write(f"pid {os.getpid()}: {text}\n")
    return text


def install(mode: str | None = None) -> None:
    """Hook the engine in `mode` (default: $VDISK_LOOP_GUARD, else 'log')."""
    mode = mode or os.environ.get(ENV_MODE) or "log"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        blocking.set_check(None)
        return
    seen: set[str] = set()

    def check(what: str) -> None:
        if not trio.lowlevel.in_trio_run():
            return  # a worker thread, or no event loop at all (offline commands)
        text = _report(what)
        if mode == "raise":
            raise BlockingOnLoopError(text)
        site = text.splitlines()[-2] if text.count("\n") > 1 else what
        if site not in seen:
            seen.add(site)
            log.error("%s", text)

    blocking.set_check(check)
