"""The dashboard's JSON endpoints, its event stream, and its actions.

Reading (anyone who reaches the address; the surface defaults to loopback):

    GET /api/fleet                       the nodes, at most ``PAGE_NODES`` rows, with counts of
                                         all (``fleetwave nodes -o json`` with a page size)
    GET /api/rollouts[?service=S]        newest first (``fleetwave rollouts -o json``)
    GET /api/rollouts/{id}               one rollout, "latest" for the latest, at most
                                         ``PAGE_NODES`` node rows (``fleetwave status ID -o json``)
    GET /api/rollouts/{id}/events        its events, oldest first (``fleetwave events --rollout``)
    GET /api/stream[?rollout=&service=]  server-sent events: a ``snapshot`` of all of the above
                                         (at most ``PAGE_NODES`` node rows of the fleet and of the
                                         rollout, with counts of all) whenever any of it changes
                                         (checked every ``POLL`` s and
                                         at each new event; the list of rollouts every
                                         ``LIST_POLL`` s between events), a comment line every
                                         ``KEEPALIVE`` s; at most ``MAX_STREAMS`` at once (503)
    GET /api/whoami                      the name of the token presented, or 401

Every read goes through the coordinator's own API (``Api.reply``, the handlers the bus serves
to the CLI), so the page and ``fleetwave status`` show the same facts, figures computed once.
Reads are shared: an answer younger than ``SHARED`` s, or one under way, serves every request
that asks the same (all of it runs on the leader's loop: N pages must not cost N reads).

Acting (an operator token, ``Authorization: Bearer``; ``coordinator.auth.web_tokens``):

    POST /api/rollouts/{id}/{pause|resume|promote|abort}   body {"full": bool} for promote
    POST /api/services/{service}/rollback                   body {"to_version": "..."}

An action is a request on the bus, ``fw.<fleet>.api.<token name>.<verb>``, from the coordinator's
own connection: the path a CLI request takes, through the queue group to the leader (a standby
forwards it), so it lands in the audit log with who = the token's name, and is refused for the
same reasons. No token, a wrong, revoked or expired one, or one whose operator is revoked or
expired in the auth directory its file is bound to: 401 and one line; nothing is sent (and one
line in the log per ``REFUSALS_LOGGED`` s, with their count).
The token travels in a header set by the page's script, never in a cookie, so another site
cannot make a browser send it (no CSRF).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from coordinator.auth.web_tokens import TokenFile
from coordinator.web.feed import Feed
from protocol import subjects
from protocol.codec import decode, encode, to_builtins
from protocol.errors import BusError, NoResponders, NotReachable, ProtocolError
from protocol.loop import bounded
from protocol.messages import (
    TERMINAL_STATES,
    ApiReply,
    ListRolloutsRequest,
    NodesRequest,
    RollbackRequest,
    RolloutRequest,
)

if TYPE_CHECKING:
    from coordinator.runtime.daemon import Coordinator

log = logging.getLogger("fleetwave.coordinator.http")

READER = "dashboard"  # the caller reads are answered for (reads record no one)
ROLLOUT_VERBS = ("pause", "resume", "promote", "abort")
ACTION_TIMEOUT = 40.0  # the daemon's forwarding takes up to 35 s; the bus says why past that
POLL = 0.5  # a stream looks for changes this often (and at every event)
LIST_POLL = 3.0  # the list of rollouts, without events, this often
SHARED = 0.4  # a read this young serves every open page
CACHE_KEYS = 256
KEEPALIVE = 15.0
SETTLED = 30.0  # a finished rollout's status, read this often at most
# The node rows a snapshot holds, of the fleet and of the rollout shown (``NodesRequest`` and
# ``RolloutRequest``'s max_nodes: the ones that want a look first, and counts of all): a page of
# 50,000 rows, read twice a second, would be ~30 MB of JSON a poll and stall the leader.
PAGE_NODES = 500
WRITE_TIMEOUT = 5.0  # a browser that reads nothing for this long is dropped
MAX_STREAMS = 64  # open event streams; each costs a snapshot's JSON at every change
REFUSALS_LOGGED = 10.0  # refused actions: one line in the log this often at most
STATUS_OF = {"usage": 400, "not_found": 404, "conflict": 409, "unavailable": 503}
LIST_LIMIT = 100
MAX_READ = 1000  # the API's own cap (coordinator.api.rollouts.MAX_LIMIT)
EVENTS_SHOWN = 300


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)


class Dashboard:
    """The handlers, over one coordinator, its event feed and (maybe) a token file."""

    def __init__(self, coordinator: Coordinator, feed: Feed, tokens: TokenFile | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.coord = coordinator
        self.feed = feed
        self.tokens = tokens
        self.clock = clock
        self._cache: dict[tuple[str, bytes, int], tuple[float, asyncio.Future[ApiReply]]] = {}
        self._settled: dict[tuple[str, bytes, int], tuple[float, asyncio.Future[ApiReply]]] = {}
        self.closing = False
        self.streams = 0
        self._refusals, self._refusals_logged = 0, -math.inf

    async def close(self, app: web.Application) -> None:
        """End every open stream now (aiohttp's on_shutdown): a stopping coordinator does not
        wait out its shutdown timeout for browsers that would never hang up."""
        self.closing = True
        async with self.feed.changed:
            self.feed.changed.notify_all()

    # -- reading ----------------------------------------------------------------------------------

    async def _read(self, verb: str, request: msgspec.Struct, *, fresh: float = 0.0,
                    settled: bool = False) -> ApiReply:
        """The API's answer; with ``fresh``, one at most that old, or one under way, may be
        reused (every open page polls, and each event wakes them all at once: N pages must not
        cost N reads). ``settled``: the answer does not change with events (a finished
        rollout's status)."""
        if not self.coord.ready.is_set():
            return ApiReply(ok=False, code="unavailable",
                            error="the coordinator is not set up yet (waiting for the bus)")
        data = encode(request)
        # An event since makes an older answer stale, but for one that is settled: those are
        # kept apart (a busy fleet's events fill and clear the other cache), and only when
        # they are answers (a failure is asked again at the next poll).
        cache = self._settled if settled else self._cache
        key = (verb, data, -1 if settled else self.feed.serial)
        now = time.monotonic()
        if fresh and (hit := cache.get(key)) is not None and (
                not hit[1].done() or now - hit[0] < fresh):
            return await asyncio.shield(hit[1])  # a page that goes away leaves it to the others
        # Owned by the cache entry (or this caller); bounded by the API's own timeout.
        read = asyncio.ensure_future(self.coord.api.reply(verb, data, READER))
        if len(cache) >= CACHE_KEYS:
            self._prune(cache, now, SETTLED if settled else LIST_POLL)
        # Full of live answers (a flood of distinct ?rollout= or IDs): this one is not kept,
        # rather than pushing out the ones every page shares.
        if len(cache) < CACHE_KEYS:
            cache[key] = (now, read)
        reply = await asyncio.shield(read)
        if settled and not reply.ok and cache.get(key, (0.0, None))[1] is read:
            del cache[key]
        return reply

    def _prune(self, cache: dict[tuple[str, bytes, int], tuple[float, asyncio.Future[ApiReply]]],
               now: float, keep: float) -> None:
        """Drop the answers no read can reuse: older than ``keep`` s, or from before the
        latest event."""
        for key in [k for k, (at, read) in cache.items()
                    if read.done() and (now - at >= keep or k[2] not in (-1, self.feed.serial))]:
            del cache[key]

    @staticmethod
    def _answer(reply: ApiReply) -> web.Response:
        if reply.ok:
            return web.json_response(to_builtins(reply.data))
        return _error(STATUS_OF.get(reply.code, 500), reply.error)

    async def fleet(self, request: web.Request) -> web.Response:
        return self._answer(await self._read("nodes", NodesRequest(max_nodes=PAGE_NODES),
                                             fresh=SHARED))

    async def rollouts(self, request: web.Request) -> web.Response:
        service = request.query.get("service", "")
        return self._answer(await self._read(
            "rollouts", ListRolloutsRequest(service=service, limit=LIST_LIMIT), fresh=SHARED))

    async def rollout(self, request: web.Request) -> web.Response:
        return self._answer(await self._read(
            "status", RolloutRequest(id=_rid(request), max_nodes=PAGE_NODES), fresh=SHARED))

    async def events(self, request: web.Request) -> web.Response:
        reply = await self._read(
            "status", RolloutRequest(id=_rid(request), max_nodes=PAGE_NODES), fresh=SHARED)
        if not reply.ok:
            return self._answer(reply)
        return web.json_response(self._events_of(str(reply.data["id"])))

    def _events_of(self, rollout: str) -> list[Any]:
        return [to_builtins(e) for e in self.feed.of(rollout, EVENTS_SHOWN)]

    async def snapshot(self, rollout: str, service: str, *,
                       list_fresh: float = 0.0) -> dict[str, Any]:
        """Everything the page shows at once; each part as its endpoint answers it (the list
        of rollouts reused while younger than ``list_fresh``, the rest read anew)."""
        out: dict[str, Any] = {
            "fleet": self.coord.fleet_name, "coordinator": self.coord.id,
            "role": "leader" if self.coord.runner is not None else "standby",
            "ready": self.coord.ready.is_set(),
            "writable": self.tokens is not None,
        }
        nodes = await self._read("nodes", NodesRequest(max_nodes=PAGE_NODES), fresh=SHARED)
        # One read of the list serves both the service filter's choices and the rows.
        rows = await self._read("rollouts", ListRolloutsRequest(limit=MAX_READ),
                                fresh=max(list_fresh, SHARED))
        every: list[dict[str, Any]] = to_builtins(rows.data) if rows.ok else []
        page = to_builtins(nodes.data) if nodes.ok else {}
        out["nodes"] = page.get("nodes", [])
        out["node_count"], out["nodes_online"] = page.get("node_count", 0), page.get("online", 0)
        out["nodes_unheard"] = page.get("unheard", 0)
        out["services"] = sorted({str(r["service"]) for r in every})
        out["rollouts"] = [r for r in every if not service or r["service"] == service][
            :LIST_LIMIT]
        out["error"] = next((r.error for r in (nodes, rows) if not r.ok), "")
        out["rollout"], out["events"] = None, []
        if rollout or out["rollouts"]:
            rid = rollout or out["rollouts"][0]["id"]
            # A finished rollout's status is read from its stored pages (~2 s at 50,000 nodes,
            # measured): read again after SETTLED s, not at every poll.
            done = any(r["id"] == rid and r["state"] in TERMINAL_STATES for r in every)
            st = await self._read("status", RolloutRequest(id=rid, max_nodes=PAGE_NODES),
                                  fresh=SETTLED if done else SHARED, settled=done)
            if st.ok:
                out["rollout"] = to_builtins(st.data)
                out["events"] = self._events_of(str(st.data["id"]))
            elif rollout:
                out["error"] = st.error
        return out

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if self.streams >= MAX_STREAMS:
            return _error(503, f"{MAX_STREAMS} dashboard streams are open, the most this "
                          "coordinator serves; close a page or try again later")
        self.streams += 1
        try:
            return await self._follow(request)
        finally:
            self.streams -= 1

    async def _follow(self, request: web.Request) -> web.StreamResponse:
        rollout = request.query.get("rollout", "")
        service = request.query.get("service", "")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        sent, quiet, seen = "", time.monotonic(), -1
        try:
            while not self.closing:
                # The list of every rollout is a read of the whole bucket: anew after an event
                # (every change of a rollout's state is one), else at most every LIST_POLL s.
                list_fresh = 0.0 if self.feed.serial != seen else LIST_POLL
                seen = self.feed.serial
                snap = await self.snapshot(rollout, service, list_fresh=list_fresh)
                # In the order built (the API's own: a rollout's nodes in motion first),
                # not sorted: sorted, the page listed nodes by id, failed ones far down.
                body = json.dumps(snap)
                if body != sent:
                    await self._send(resp, f"event: snapshot\ndata: {body}\n\n")
                    sent, quiet = body, time.monotonic()
                elif time.monotonic() - quiet > KEEPALIVE:
                    await self._send(resp, ": keepalive\n\n")
                    quiet = time.monotonic()
                async with self.feed.changed:
                    # the next event, or the next poll (records change without events)
                    with contextlib.suppress(TimeoutError):
                        await bounded(self.feed.changed.wait(), POLL)
        except ConnectionError:  # reset, or aiohttp's own "Connection lost" from drain
            pass  # the browser went away: nothing to clean up but us
        except TimeoutError:
            # It stopped reading: its socket and the data it left unsent go now, not when (if
            # ever) it hangs up (aiohttp would wait to send the end of the stream).
            if request.transport is not None:
                request.transport.abort()
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, text: str) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await resp.write(text.encode())

    # -- acting -----------------------------------------------------------------------------------

    def _who(self, request: web.Request) -> str | web.Response:
        """The token's name, or the 401 (or 403 read-only) that refuses the request."""
        if self.tokens is None:
            return _error(403, "this dashboard is read-only: the coordinator runs without "
                          "--http-tokens; act with the fleetwave CLI, or restart it with a token "
                          "file made by 'fleetwave auth add-web-token'")
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if header and scheme.lower() != "bearer":
            return _error(401, "the Authorization header must be 'Bearer TOKEN'")
        verdict = self.tokens.verify(token.strip(), self.clock())
        if verdict.refusal:
            self._refused(request.remote, verdict.refusal)
            return _error(401, verdict.refusal)
        return verdict.name

    def _refused(self, remote: str | None, why: str) -> None:
        """One line per ``REFUSALS_LOGGED`` s at most, with the count since the last one:
        anyone who reaches the address can send refused requests."""
        self._refusals += 1
        now = self.clock()
        if 0 <= now - self._refusals_logged < REFUSALS_LOGGED:
            return
        log.warning("http: refused %d dashboard request(s) since the last such line; the latest "
                    "from %s: %s", self._refusals, remote, why)
        self._refusals, self._refusals_logged = 0, now

    async def whoami(self, request: web.Request) -> web.Response:
        who = self._who(request)
        return who if isinstance(who, web.Response) else web.json_response({"name": who})

    async def act(self, request: web.Request) -> web.Response:
        verb = request.match_info["verb"]
        if verb not in ROLLOUT_VERBS:
            return _error(404, f"no action {verb!r}; the actions are {', '.join(ROLLOUT_VERBS)}")
        who = self._who(request)
        if isinstance(who, web.Response):
            return who
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        full = body.get("full", False)
        if not isinstance(full, bool):
            return _error(400, f"'full' must be true or false, not a JSON {_kind(full)}")
        req = RolloutRequest(id=request.match_info["id"], full=full)
        return await self._send_request(who, verb, req)

    async def rollback(self, request: web.Request) -> web.Response:
        who = self._who(request)
        if isinstance(who, web.Response):
            return who
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        to_version = body.get("to_version", "")
        if not isinstance(to_version, str):
            return _error(400, "'to_version' must be a version string (or left out: the one "
                          f"before), not a JSON {_kind(to_version)}")
        req = RollbackRequest(service=request.match_info["service"], to_version=to_version)
        return await self._send_request(who, "rollback", req)

    async def _send_request(self, who: str, verb: str, req: msgspec.Struct) -> web.Response:
        bus = self.coord.bus
        if bus is None or not self.coord.ready.is_set():
            return _error(503, "the coordinator is not connected to the bus yet; try again")
        log.info("http: %s asks to %s (%s)", who, verb, to_builtins(req))
        try:
            raw = await bus.request(subjects.api(self.coord.fleet_name, who, verb), encode(req),
                                    timeout=ACTION_TIMEOUT)
            reply = decode(ApiReply, raw)
        except NoResponders as exc:  # no coordinator got it: nothing can have been done
            return _error(503, f"{verb} was not carried out: {exc}")
        except NotReachable:
            # Sent, unanswered: the leader (frozen, or swamped) may still carry it out.
            return _error(503, f"no answer to {verb} within {ACTION_TIMEOUT:g}s: it may still be "
                               "carried out; look at the rollout before you try again")
        except (BusError, ProtocolError) as exc:
            return _error(503, f"{verb} was not carried out: {exc}")
        if not reply.ok:
            return _error(STATUS_OF.get(reply.code, 500), reply.error)
        return web.json_response({"ok": True, "who": who, "data": to_builtins(reply.data)})


def _kind(value: object) -> str:
    """A JSON value's type as the JSON spec names it (what a refusal says, not the value)."""
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), "null")


def _rid(request: web.Request) -> str:
    rid = request.match_info["id"]
    return "" if rid == "latest" else rid


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        return _error(400, "the request body is not JSON; send {} or nothing")
    if not isinstance(data, dict):
        return _error(400, "the request body must be a JSON object")
    return data
