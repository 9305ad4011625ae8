"""The CLI's one way to talk to NATS and to the coordinator's API.

``connected(ctx)`` is a connection bounded in time (a CLI must fail fast when there is no NATS,
whatever nats-py's own reconnect settings would do); ``call(ctx, verb, request)`` sends one API
request (a writing verb straight to the leading coordinator, ``_ask``) on a subject that names the
caller (``Ctx.caller``: the credentials' name, or the OS user on an open bus), and returns the
reply's ``data``, or raises:

    NotReachable   no NATS at the URL, or no coordinator answers (one line saying how to start one);
                   a writing verb that timed out says it may still be carried out (``_unanswered``)
    RemoteError    the coordinator answered ``ok=False``; ``code`` "usage" exits 2, others 1
                   (``data``: what it still says, e.g. the id of a rollout it "accepted")
                   ("unavailable" — no coordinator leads for a moment, during a takeover — is
                   asked again for up to ``TAKEOVER_WAIT`` before it is raised)
    ProtocolError  the reply is not an ApiReply (a coordinator of another protocol version)

``request(ctx, verb, req)`` is the synchronous form click commands use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from coordinator.cli.base import Ctx
from coordinator.errors import RemoteError, UsageError
from protocol import subjects
from protocol.bus import REQUEST_TIMEOUT, Bus, redact
from protocol.codec import decode, encode
from protocol.errors import NoResponders, NotReachable, ProtocolError
from protocol.messages import (
    ApiReply,
    CordonRequest,
    DeployRequest,
    ForgetRequest,
    LeaderRequest,
    RollbackRequest,
    RolloutRequest,
)
from protocol.urls import check_servers

CONNECT_TIMEOUT = 3.0
TAKEOVER_WAIT = 6.0  # a takeover takes at most the lease ttl and a poll (coordinator.runtime.lease)
LEADER_TIMEOUT = 2.0


@contextlib.asynccontextmanager
async def connected(ctx: Ctx, *, timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[Bus]:
    """A Bus for one CLI command; NotReachable within ``timeout`` if NATS does not answer,
    UsageError at once if ``--nats`` is no URL to try (``check_nats``)."""
    check_nats(ctx.nats_url)
    try:
        async with asyncio.timeout(timeout):
            bus = await Bus.connect(
                ctx.nats_url, ctx.fleet, name="fleetwave-cli", connect_deadline=timeout,
                **ctx.access(),
            )
    except TimeoutError:
        # nats-py retries the first connect by itself for as long as its reconnect settings
        # allow (a minute), past Bus.connect's own deadline: the CLI cuts it short here.
        raise NotReachable(
            f"cannot reach NATS at {redact(ctx.nats_url)} (no answer within {timeout:g}s); start a "
            "broker with 'fleetwave broker' or a dev fleet with 'fleetwave dev up', or pass --nats"
        ) from None
    try:
        yield bus
    finally:
        # No drain: every answer a command waits for is in, and a drain's round trips to the
        # server (one per subscription, then one more: 2-10 ms on a busy broker) came on top
        # of each command's exit, a followed deploy's included (issue 17).
        await bus.close(drain=False)


def check_nats(url: str) -> None:
    """UsageError (exit 2, one line) if ``url`` (``--nats``) is not one or more NATS server URLs
    (``protocol.urls``): a malformed one would otherwise wait out the connect deadline and read
    as a server that does not answer."""
    try:
        check_servers(url)
    except ProtocolError as exc:
        raise UsageError(str(exc)) from None


async def call(
    ctx: Ctx, verb: str, request: Any, *, timeout: float = REQUEST_TIMEOUT,
    bus: Bus | None = None,
) -> Any:
    """Send ``request`` to the coordinator's ``verb`` endpoint and return the reply's data;
    on ``bus`` if given (a command that calls many times), else on a connection of its own."""
    if bus is None:
        async with connected(ctx) as own:
            return await call(ctx, verb, request, timeout=timeout, bus=own)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + TAKEOVER_WAIT
    while True:
        try:
            raw = await _ask(bus, ctx.caller, verb, encode(request), timeout)
        except NoResponders:
            raise  # nobody got it: nothing can have been done
        except NotReachable:
            if verb not in subjects.WRITE_VERBS:
                raise
            raise NotReachable(_unanswered(bus.fleet, request, timeout)) from None
        reply = decode(ApiReply, raw)
        if reply.ok or reply.code != "unavailable" or loop.time() >= give_up:
            break
        await asyncio.sleep(0.25)
    if not reply.ok:
        raise RemoteError(reply.error or f"the coordinator refused {verb!r}", reply.code,
                          reply.data)
    return reply.data


def _unanswered(fleet: str, request: Any, timeout: float) -> str:
    """What a writing request that timed out says: the coordinator may have got it and still
    carry it out (a frozen leader resumes and starts the rollout), so a blind retry could do it
    twice; where to look first."""
    if isinstance(request, DeployRequest):
        look = f"'fleetwave rollouts --service {request.spec.service}' (or 'fleetwave status')"
    elif isinstance(request, RollbackRequest):
        look = f"'fleetwave rollouts --service {request.service}' (or 'fleetwave status')"
    elif isinstance(request, RolloutRequest) and request.id:
        look = f"'fleetwave status {request.id}'"
    elif isinstance(request, CordonRequest | ForgetRequest):
        look = "'fleetwave nodes'"
    else:
        look = "'fleetwave rollouts' (or 'fleetwave status')"
    return (f"the coordinator of fleet {fleet!r} did not answer within {timeout:g}s; it may "
            f"still carry the request out: check {look} before you retry")


async def _ask(bus: Bus, caller: str, verb: str, data: bytes, timeout: float) -> bytes:
    """One request: a reading verb to every coordinator (the first answer wins); a writing verb
    straight to the leader's own subject, so that no frozen standby of the queue group can
    swallow it (through the queue group when the leader is unknown or its subject is gone)."""
    if verb in subjects.WRITE_VERBS:
        holder = await _holder(bus, caller)
        if holder:
            try:
                return await bus.request(
                    subjects.coordinator_api(bus.fleet, holder, caller, verb), data,
                    timeout=timeout)
            except NoResponders:
                pass  # that leader is gone: whoever leads now answers through the queue group
            except NotReachable:
                # Frozen or cut off: a standby leads within the lease's ttl, by now most often.
                # Asked again, another that leads gets the request; the silent one, deposed,
                # carries out nothing of it when it wakes (its writes are fenced).
                now = await _holder(bus, caller)
                if not now or now == holder:
                    raise
                return await bus.request(
                    subjects.coordinator_api(bus.fleet, now, caller, verb), data,
                    timeout=timeout)
    return await bus.request(subjects.api(bus.fleet, caller, verb), data, timeout=timeout)


async def _holder(bus: Bus, caller: str) -> str:
    """The id of the leading coordinator, as the first coordinator to answer says ("" if none
    does in time)."""
    try:
        reply = decode(ApiReply, await bus.request(subjects.api(bus.fleet, caller, "leader"),
                                                   b"{}", timeout=LEADER_TIMEOUT))
    except (NotReachable, ProtocolError):
        return ""
    data = reply.data if reply.ok and isinstance(reply.data, dict) else {}
    holder = data.get("holder")
    return holder if isinstance(holder, str) else ""


def leader_line(ctx: Ctx) -> str:
    """Which coordinator leads, in one line for people ("" if the coordinator cannot say)."""
    try:
        info = request(ctx, "leader", LeaderRequest(), timeout=2.0)
    except (RemoteError, NotReachable):
        return ""
    if not isinstance(info, dict) or "holder" not in info:
        return "coordinator: none leads right now (a standby takes over within seconds)"
    return (f"coordinator: {info.get('host', '?')} pid {info.get('pid', '?')} leads "
            f"(id {info['holder']}, term {info.get('term', '?')})")


def request(ctx: Ctx, verb: str, req: Any, *, timeout: float = REQUEST_TIMEOUT) -> Any:
    """``call`` for click commands (runs its own event loop)."""
    return asyncio.run(call(ctx, verb, req, timeout=timeout))
