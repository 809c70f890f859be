"""uvicorn's h11 protocol with the limits it lacks: a request-header deadline and per-address connection caps.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no deadline for a
request's headers, and ``limit_concurrency`` counts connections from everyone together. So one
client trickling a header line every few seconds over hundreds of sockets could hold the server.
:class:`GuardedH11Protocol` adds, per connection:

- a deadline (``ServeConfig.header_timeout_s``) for the headers of each request, from the moment
  the connection opens or its previous response ends; past it the connection is closed (408 when
  part of a request had arrived);
- a cap per client address (``max_connections_per_client``): a new connection over it closes that
  address's connection that has waited longest for its next request, if that is over a tenth of the
  header deadline (so a probe from an address that trickles still gets in, and a client's fresh
  connection is never cut before it could send); otherwise the new one is answered 503;
- a cap on all connections (``max_connections``): over it, 503 + Retry-After at once.

A refused connection gets its 503 and a lingering close (its request is read and dropped for up
to a second), so the client reads the 503 instead of a reset. Refused connections do not count.
- no traceback for a malformed request the h11 parser or uvicorn trip over: a 400 and a log line.

The body deadline is the app's (it reads bodies with ``body_timeout_s``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from holst.config import ServeConfig
from holst.utils.runtime import get_logger

logger = get_logger("holst.serve")


@dataclasses.dataclass
class ConnectionStats:
    """Counters of one server's connections (shown by ``/health``)."""

    open: int = 0
    refused: int = 0
    evicted: int = 0
    timed_out: int = 0
    malformed: int = 0


class HolstUvicornConfig(uvicorn.Config):
    """``uvicorn.Config`` that carries the :class:`ServeConfig` limits and the stats to the protocol."""

    def __init__(self, app: Any, *, serve: ServeConfig, stats: ConnectionStats | None = None, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedH11Protocol, **kwargs)
        self.serve = serve
        self.stats = stats or ConnectionStats()


def _raw_reply(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message, "status": status}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """One HTTP/1.1 connection (uvicorn's h11 protocol) under the deadlines and caps above."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ServeConfig = getattr(config, "serve", None) or ServeConfig()
        # The app's counters (its lifespan hands them over), else the config's (a bare uvicorn app).
        self.stats: ConnectionStats = app_state.get("holst_stats") or getattr(config, "stats", None) \
            or ConnectionStats()
        self.armed_at = 0.0  # when it began waiting for its next request
        self.refused = False
        self._deadline: Any = None  # asyncio.TimerHandle
        self._partial = False  # bytes of a next request arrived since the deadline was armed
        self._counted = False

    @property
    def waiting(self) -> bool:
        """Not inside a request: still sending headers, or idle between requests."""
        return self.cycle is None or self.cycle.response_complete

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        """Count the connection; over a cap, refuse it (503) or evict an idle one; arm its header deadline."""
        super().connection_made(transport)
        self.stats.open += 1
        self._counted = True
        live = [c for c in self.connections if c is not self and not getattr(c, "refused", False)
                and not c.transport.is_closing()]
        if len(live) >= self.limits.max_connections:
            self._refuse("too many open connections")
            return
        host = self.client[0] if self.client else None
        mine = [c for c in live if getattr(c, "client", None) and c.client[0] == host] if host else []
        if len(mine) >= self.limits.max_connections_per_client:
            grace = self.limits.header_timeout_s / 10
            now = self.loop.time()
            idle = [c for c in mine if isinstance(c, GuardedH11Protocol) and c.waiting and now - c.armed_at > grace]
            if not idle:
                self._refuse(f"too many open connections from {host}")
                return
            min(idle, key=lambda c: c.armed_at).evict()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the header deadline and uncount the connection."""
        self._disarm()
        if self._counted:
            self.stats.open -= 1
            self._counted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed bytes to h11; malformed HTTP gets a 400 and the connection closes."""
        if self.refused:
            return  # the lingering close of a refused connection: read and drop
        self._partial = True
        try:
            super().data_received(data)
        except Exception as e:  # e.g. a Content-Length of 5,000 digits, a non-ASCII request target
            self.stats.malformed += 1
            logger.warning("malformed request from %s: %s: %s", self._who(), type(e).__name__, str(e)[:200])
            if not self.transport.is_closing():
                self.transport.write(_raw_reply(400, "Bad Request", "malformed HTTP request"))
                self.transport.close()
            return
        if self._deadline is not None and not self.waiting:
            self._disarm()  # a request's headers are in: the app's body deadline takes over

    def on_response_complete(self) -> None:
        """After a reply, arm the header deadline for the next request."""
        super().on_response_complete()
        if not self.transport.is_closing() and self.waiting:
            self._arm()

    # ------------------------------------------------------------------ limits
    def evict(self) -> None:
        """Close this connection (it is not inside a request) to make room for a newer one."""
        self.stats.evicted += 1
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, message: str) -> None:
        self.stats.refused += 1
        self.refused = True
        self._disarm()
        self.transport.write(_raw_reply(503, "Service Unavailable", message,
                                        f"Retry-After: {self.limits.retry_after_s}\r\n"))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(1.0, self.transport.close)

    def eof_received(self) -> bool | None:
        """The client closed its side: a refused connection closes now."""
        if self.refused:
            self.transport.close()
        return super().eof_received()

    def _arm(self) -> None:
        self._disarm()
        self._partial = False
        self.armed_at = self.loop.time()
        self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self.waiting:
            return
        self.stats.timed_out += 1
        if self._partial:
            self.transport.write(_raw_reply(408, "Request Timeout",
                                            f"request headers not complete within {self.limits.header_timeout_s} s"))
        self.transport.close()

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"
