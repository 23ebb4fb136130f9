"""The supervisor's private line to one worker: a socketpair carrying the control protocol's JSON lines.

Why a socketpair and not a socket file per worker: nothing is left on disk when the supervisor is killed,
and no other process can reach a worker (the public socket's 0600 mode stays the only way in). The worker
serves its end with :meth:`engine.control.ControlServer.serve_connected`; this end sends one request at a
time (a lock keeps answers in order) and gives up on a worker that does not answer within ``timeout``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from engine.control import MAX_REQUEST_BYTES


class ChannelClosed(Exception):
    """The worker closed its end (it exited) or did not answer in time."""


class WorkerChannel:
    """Request/answer over this side of a worker's socketpair (see the module docstring)."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self._sock = sock
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.closed = False

    @classmethod
    def pair(cls, timeout: float = 5.0) -> tuple[WorkerChannel, socket.socket]:
        """A channel and the worker's end of it (inheritable, to pass to the worker process)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)
        return cls(ours, timeout), theirs

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._sock.setblocking(False)
            self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=4 * MAX_REQUEST_BYTES)
        return self._reader, self._writer

    async def ask(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """The worker's whole answer object (``{"ok": ..., "result"|"error": ...}``) to ``request``."""
        if self.closed:
            raise ChannelClosed("the worker's line is closed")
        async with self._lock:
            reader, writer = await self._open()
            try:
                writer.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), self.timeout if timeout is None else timeout)
            except asyncio.TimeoutError:  # before OSError: on 3.11 it is the builtin TimeoutError, an OSError
                self.close()  # a late answer would be read as the next request's: this line is spent
                raise ChannelClosed("the worker did not answer in time") from None
            except (OSError, ValueError, asyncio.LimitOverrunError) as error:
                self.close()
                raise ChannelClosed(f"the worker's line failed: {error or type(error).__name__}") from None
        if not line:
            self.close()
            raise ChannelClosed("the worker closed its line")
        try:
            answer = json.loads(line)
        except ValueError:
            raise ChannelClosed(f"the worker sent a malformed answer: {line[:200]!r}") from None
        if not isinstance(answer, dict):
            raise ChannelClosed("the worker's answer is not an object")
        return answer

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
