"""Read plans: where each byte of a range of a chain's view comes from.

The block layer uses a plan to read a remote chain without holding the chain while the
network answers: the plan is made from metadata (under the lock, in a worker thread),
then the pieces that are plain data in a network source are fetched by the caller, in
parallel and outside any lock, and the rest is read from its layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdisk.engine.chain import chain_status
from vdisk.engine.image import Image, Status
from vdisk.engine.remote import RemoteSource


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of the view: held by `layer` (None: by no layer above base), as zeroes when
    `zero`; when `source` is set, its bytes are at `host` in that network source."""

    offset: int
    length: int
    layer: Image | None
    zero: bool = False
    source: RemoteSource | None = None
    host: int = 0


def read_plan(img: Image, offset: int, length: int, *, base: Image | None = None,
              max_pieces: int = 256) -> list[Piece]:
    """The pieces of [offset, offset+length) of img's view, in order; they cover a prefix
    of the range (all of it unless max_pieces were reached). Past img's end: nothing."""
    pieces: list[Piece] = []
    end = min(offset + length, img.virtual_size)
    pos = offset
    while pos < end and len(pieces) < max_pieces:
        run, depth, status = chain_status(img, pos, end - pos, base=base)
        if depth is None:
            pieces.append(Piece(pos, run, None, zero=status is Status.ZERO))
            pos += run
            continue
        layer: Image | None = img
        for _ in range(depth):
            assert layer is not None
            layer = layer.backing
        assert layer is not None
        if status is Status.ZERO or pos >= layer.virtual_size:
            pieces.append(Piece(pos, run, layer, zero=True))
            pos += run
            continue
        done = 0
        while layer.remote and done < run:
            loc = layer.remote_location(pos + done, run - done)
            if loc is None:
                break
            source, host, n = loc
            pieces.append(Piece(pos + done, n, layer, source=source, host=host))
            done += n
        if done < run:
            pieces.append(Piece(pos + done, run - done, layer))
        pos += run
    return pieces
