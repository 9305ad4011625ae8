"""The API's one codec path: every failure becomes an ApiReply, never an exception."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from coordinator.api.verbs import Api
from coordinator.errors import RemoteError, UsageError
from protocol.codec import decode, encode
from protocol.errors import BusError, Conflict
from protocol.messages import ApiReply, NodesRequest


def reply(api: Api, verb: str, data: bytes) -> ApiReply:
    return decode(ApiReply, asyncio.run(api.handle(verb, data, "alice")))


def make(handler: object) -> Api:
    api = Api(timeout=0.2)
    api.add("nodes", NodesRequest, handler)  # type: ignore[arg-type]
    return api


async def echo(req: NodesRequest, caller: str) -> dict[str, str]:
    return req.selector


def test_a_good_request_gets_ok_and_data() -> None:
    """The handler's result comes back as ok=True data."""
    r = reply(make(echo), "nodes", encode(NodesRequest(selector={"zone": "a"})))
    assert (r.ok, r.data) == (True, {"zone": "a"})


def test_an_empty_body_means_defaults() -> None:
    """An empty request is the request type's defaults, for shell users."""
    assert reply(make(echo), "nodes", b"").data == {}


@pytest.mark.parametrize(
    "data", [b"{", b"\xff\xfe", b"[]", b'{"selector": 5}', b'{"selector": {"a": 1}}', b"null"]
)
def test_malformed_requests_get_a_usage_reply(data: bytes) -> None:
    """Bytes that do not decode as the request type get ok=False code=usage."""
    r = reply(make(echo), "nodes", data)
    assert (r.ok, r.code) == (False, "usage")
    assert "NodesRequest" in r.error


def test_unknown_verb_gets_a_usage_reply() -> None:
    """A verb nobody serves is a usage error naming the verb."""
    r = reply(make(echo), "launch", b"{}")
    assert (r.ok, r.code) == (False, "usage") and "launch" in r.error


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UsageError("bad flag"), "usage"),
        (Conflict("a rollout of hello runs"), "conflict"),
        (RemoteError("no such rollout", "not_found"), "not_found"),
        (BusError("JetStream is away"), "internal"),
    ],
)
def test_handler_errors_map_to_codes(exc: Exception, code: str) -> None:
    """Each error of the trees maps to its reply code and keeps its message."""
    async def handler(req: NodesRequest, caller: str) -> None:
        raise exc

    r = reply(make(handler), "nodes", b"{}")
    assert (r.ok, r.code, r.error) == (False, code, str(exc))


def test_a_crashing_handler_gets_an_internal_reply() -> None:
    """A bug in a handler is reported as internal, without its details leaking as a traceback."""
    async def handler(req: NodesRequest, caller: str) -> None:
        raise KeyError("oops")

    r = reply(make(handler), "nodes", b"{}")
    assert (r.ok, r.code) == (False, "internal") and "KeyError" in r.error


def test_a_stuck_handler_times_out() -> None:
    """A handler that does not finish in time answers internal instead of hanging the caller."""
    async def handler(req: NodesRequest, caller: str) -> None:
        await asyncio.Event().wait()

    r = reply(make(handler), "nodes", b"{}")
    assert (r.ok, r.code) == (False, "internal") and "within" in r.error


def test_unencodable_data_gets_an_internal_reply() -> None:
    """A handler returning something JSON cannot carry still gets a reply."""
    async def handler(req: NodesRequest, caller: str) -> object:
        return object()

    r = reply(make(handler), "nodes", b"{}")
    assert (r.ok, r.code) == (False, "internal")


def test_a_verb_cannot_be_registered_twice() -> None:
    """Registering a verb twice is a programming error caught at start."""
    api = make(echo)
    with pytest.raises(ValueError, match="twice"):
        api.add("nodes", NodesRequest, echo)


def test_endpoints_map_verbs_to_fleet_subjects() -> None:
    """The endpoint table serves each verb on fw.<fleet>.api.*.<verb> through handle()."""
    eps = make(echo).endpoints("prod")
    subject, fn = eps["nodes"]
    assert subject == "fw.prod.api.*.nodes"
    out = msgspec.json.decode(asyncio.run(fn("fw.prod.api.alice.nodes",
                                             b'{"selector": {"x": "1"}}')))
    assert out == {"ok": True, "data": {"x": "1"}, "error": "", "code": ""}


async def whoami(req: NodesRequest, caller: str) -> str:
    return caller


@pytest.mark.parametrize(("subject", "caller"), [
    ("fw.prod.api.alice.nodes", "alice"),
    ("fw.prod.coord.c0ffee.api.bob.nodes", "bob"),
    ("fw.prod.api.nodes", "unknown"),
    ("fw.prod.coord.c0ffee.api.nodes", "unknown"),
])
def test_the_caller_comes_from_the_subject(subject: str, caller: str) -> None:
    """A handler gets the caller the request's subject names ("unknown" on an older CLI's)."""
    out = decode(ApiReply, asyncio.run(make(whoami).on_subject("nodes", subject, b"{}")))
    assert (out.ok, out.data) == (True, caller)


def test_a_caller_in_the_body_is_ignored() -> None:
    """A who (or caller) a client writes into a request body changes nothing: the subject says."""
    body = b'{"selector": {}, "who": "mallory", "caller": "mallory"}'
    out = decode(ApiReply, asyncio.run(make(whoami).on_subject("nodes", "fw.p.api.alice.nodes",
                                                               body)))
    assert (out.ok, out.data) == (True, "alice")


def test_a_subject_naming_no_valid_caller_gets_a_usage_reply() -> None:
    """A caller token check_name refuses (here '+') is refused before any handler runs."""
    out = decode(ApiReply, asyncio.run(make(whoami).on_subject("nodes", "fw.p.api.a+b.nodes",
                                                               b"{}")))
    assert (out.ok, out.code) == (False, "usage")


def test_a_remote_error_keeps_what_it_still_knows() -> None:
    """A RemoteError's data (an accepted deploy's id) travels in the reply beside the error."""
    async def handler(req: NodesRequest, caller: str) -> None:
        raise RemoteError("recorded, not started", "accepted", {"id": "hello-r1"})

    r = reply(make(handler), "nodes", b"{}")
    assert (r.ok, r.code, r.error, r.data) == (False, "accepted", "recorded, not started",
                                               {"id": "hello-r1"})


def test_an_answer_past_what_the_bus_carries_is_a_usage_reply() -> None:
    """An answer larger than ``max_reply`` (what ``protocol.chunks`` carries on the server) is
    refused in one line naming the way out, not sent to be cut short; one that fits is sent."""
    async def big(req: NodesRequest, caller: str) -> str:
        return "x" * 5000

    api = make(big)
    api.max_reply = lambda: 4000
    r = reply(api, "nodes", b"{}")
    assert (r.ok, r.code) == (False, "usage")
    assert "'nodes'" in r.error and "--selector" in r.error and "max_payload" in r.error
    api.max_reply = lambda: 6000
    assert reply(api, "nodes", b"{}").data == "x" * 5000
