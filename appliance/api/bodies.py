"""Request bodies as streams the blob store can fill its own buffers from.

Under gunicorn, the WSGI body returns new ``bytes`` objects assembled through an in-memory
buffer, which costs several copies of every byte of an upload. When the body has a known
length, ``request_body()`` instead reads the connection's socket directly with
``recv_into``, after handing over whatever gunicorn already buffered, and keeps gunicorn's
own count of the remaining body exact, so keep-alive and the next request are unaffected.
Any other server (or any other shape of gunicorn's objects) gets the ordinary stream.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from flask import request


class _SocketBody(io.RawIOBase):
    """The rest of a gunicorn request body of known length, read from its socket."""

    def __init__(self, reader, unreader, sock):
        self._reader = reader
        self._sock = sock
        buffered = unreader.take_buffered()
        body, rest = buffered[: reader.length], buffered[reader.length :]
        if rest:  # a pipelined next request: give it back untouched
            unreader.unread(rest)
        self._pending = memoryview(body)

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        remaining = self._reader.length
        if remaining <= 0 or not len(target):
            return 0
        wanted = min(len(target), remaining)
        if self._pending:
            count = min(wanted, len(self._pending))
            target[:count] = self._pending[:count]
            self._pending = self._pending[count:]
        else:
            count = self._sock.recv_into(memoryview(target)[:wanted])
            if count == 0:
                return 0
        self._reader.length -= count
        return count


def request_body() -> BinaryIO:
    """The body of the current request as a readable stream (with ``readinto``)."""
    body = request.environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    unreader = getattr(reader, "unreader", None)
    sock = getattr(unreader, "sock", None)
    if (
        type(reader).__name__ == "LengthReader"
        and sock is not None
        and callable(getattr(unreader, "take_buffered", None))
        and isinstance(getattr(reader, "length", None), int)
    ):
        return _SocketBody(reader, unreader, sock)
    return request.stream
