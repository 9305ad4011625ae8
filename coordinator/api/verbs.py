"""The coordinator's API: a table of verbs, each a request type and an async handler.

Theory of operation: every verb is served on ``fw.<fleet>.api.<caller>.<verb>`` by the NATS micro
service "fleetwave-coordinator" (``protocol.subjects``: the subject names the caller, which the
server's permissions pin to the caller's credentials). A request goes through one codec path,
``Api.handle``:

    bytes --decode(request type)--> request --handler(request, caller)--> data
          --encode--> ApiReply(ok=True, data)

The caller comes from the subject only, never from the body: a handler gets it as its own
argument, and a ``who`` a client writes into a request is no field of any request type (msgspec
ignores unknown fields).

and every failure on the way becomes an ``ApiReply(ok=False, code, error)`` instead of an
exception, so that no request, however malformed, can crash the coordinator or leave a caller
waiting for a timeout:

    ProtocolError, UsageError, ConfigError   code "usage"      the request was wrong
    Conflict                                 code "conflict"   e.g. a rollout already runs
    RemoteError(code=...)                    its own code      a handler refusing with a reason
    BusError, other FleetwaveError           code "internal"   the fleet or NATS misbehaved
    any other exception, or a timeout        code "internal"   our bug: logged with traceback

An empty request body means "all defaults" (``{}``), so ``nats req fw.default.api.me.nodes ''``
works from the shell. To add a verb: ``api.add("deploy", DeployRequest, handler)``, where
``handler(request, caller)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from coordinator.errors import ConfigError, FleetwaveError, RemoteError, UsageError
from protocol import chunks, subjects
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict, ProtocolError
from protocol.messages import ApiReply

if TYPE_CHECKING:  # the type only: the API itself never touches the bus
    from protocol.bus import Handler

log = logging.getLogger("fleetwave.coordinator.api")

HANDLER_TIMEOUT = 30.0  # a handler that takes longer is a bug or a stuck bus; say so

Req = TypeVar("Req")


@dataclass(frozen=True)
class Endpoint(Generic[Req]):
    request: type[Req]
    handler: Callable[[Req, str], Awaitable[Any]]


class Api:
    """Verb → (request type, handler); ``handle`` turns bytes into an encoded ApiReply."""

    def __init__(self, *, timeout: float = HANDLER_TIMEOUT) -> None:
        self._endpoints: dict[str, Endpoint[Any]] = {}
        self._timeout = timeout
        # The largest answer the bus can carry now (``protocol.chunks.carried`` of the server
        # it is connected to; 0: no bound), set once connected: a larger one is answered with
        # a usage error instead. Asked at each answer: a reconnect may reach another server.
        self.max_reply: Callable[[], int] = lambda: 0

    def add(self, verb: str, request: type[Req],
            handler: Callable[[Req, str], Awaitable[Any]]) -> None:
        """Serve ``verb``: requests decode as ``request`` and go to ``handler``."""
        if verb in self._endpoints:
            raise ValueError(f"API verb {verb!r} is registered twice")
        subjects.check_name("API verb", verb)
        self._endpoints[verb] = Endpoint(request, handler)

    @property
    def verbs(self) -> list[str]:
        return sorted(self._endpoints)

    async def handle(self, verb: str, data: bytes, caller: str) -> bytes:
        """Answer one request of ``caller``; never raises (except on cancellation)."""
        reply = await self.reply(verb, data, caller)
        try:
            out = encode(reply)
        except (TypeError, ValueError, OverflowError) as exc:  # a handler returned odd data
            log.error("API %s returned data that cannot be encoded: %s", verb, exc)
            return encode(ApiReply(ok=False, code="internal", error=f"cannot encode reply: {exc}"))
        bound = self.max_reply()
        if bound and len(out) > bound:
            return encode(ApiReply(
                ok=False, code="usage",
                error=f"the answer to {verb!r} is {_mib(len(out))}, more than one answer may "
                f"carry on this NATS server ({_mib(bound)}: {chunks.MAX_CHUNKS} "
                "messages of its max_payload); ask for less (e.g. --selector) or raise "
                "max_payload in the server's configuration"))
        return out

    async def reply(self, verb: str, data: bytes, caller: str) -> ApiReply:
        endpoint = self._endpoints.get(verb)
        if endpoint is None:
            return ApiReply(ok=False, code="usage", error=f"unknown API verb {verb!r}")
        try:
            request = decode(endpoint.request, data if data.strip() else b"{}")
            async with asyncio.timeout(self._timeout):
                result = await endpoint.handler(request, caller)
        except (ProtocolError, UsageError, ConfigError) as exc:
            return ApiReply(ok=False, code="usage", error=str(exc))
        except Conflict as exc:
            return ApiReply(ok=False, code="conflict", error=str(exc))
        except RemoteError as exc:
            return ApiReply(ok=False, code=exc.code, error=str(exc), data=exc.data)
        except (BusError, FleetwaveError) as exc:
            log.warning("API %s failed: %s", verb, exc)
            return ApiReply(ok=False, code="internal", error=str(exc))
        except TimeoutError:
            log.error("API %s did not finish within %gs", verb, self._timeout)
            return ApiReply(
                ok=False, code="internal",
                error=f"the coordinator did not finish {verb!r} within {self._timeout:g}s; "
                "see its log",
            )
        except Exception as exc:
            log.exception("API %s crashed", verb)
            return ApiReply(
                ok=False, code="internal",
                error=f"internal error in the coordinator ({type(exc).__name__}); see its log",
            )
        return ApiReply(ok=True, data=result)

    async def on_subject(self, verb: str, subject: str, data: bytes) -> bytes:
        """Answer a request that arrived on ``subject``, for the caller it names
        (``subjects.api_caller``: "unknown" on an older CLI's subject)."""
        try:
            caller = subjects.api_caller(subject)
        except ProtocolError as exc:
            return encode(ApiReply(ok=False, code="usage", error=str(exc)))
        return await self.handle(verb, data, caller)

    def endpoints(self, fleet: str) -> dict[str, tuple[str, Handler]]:
        """The endpoint table ``Bus.serve`` takes: name → (subject, handler of subject and
        bytes), every caller's subject of each verb."""
        out: dict[str, tuple[str, Handler]] = {}
        for verb in self._endpoints:
            async def on_request(subject: str, data: bytes, verb: str = verb) -> bytes:
                return await self.on_subject(verb, subject, data)

            out[verb] = (subjects.api_endpoint(fleet, verb), on_request)
        return out


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"
