"""Request smuggling against the real router process: every ambiguous way to frame a request.

Each case sends one client's bytes to a real router (``start_router``) in front of the recording
upstream of ``test_router_security`` (a real HTTP/1.1 server on 127.0.0.1 that parses what it gets
as a lenient server would: LF-ended chunk lines, any-case header names) and holds one of two
outcomes:

- **refused**: the router answers the expected 4xx/5xx and closes the connection, well within the
  idle deadline, and the upstream sees nothing of it;
- **forwarded**: the upstream gets exactly the requests the client sent (by path, once each, in
  order, with the body the client framed) and each head in one form no parser can read two ways
  (``assert_one_form``).

Either way the payload hidden in a body (``SMUGGLED``, a request of its own) never reaches the
upstream as a request: never two requests upstream where the client sent one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from tests.hostile import one_form_problem
from tests.integration import test_router_security as sec
from tests.integration.test_router import Router
from tests.integration.test_router_security import SMUGGLED, Raw, Recorder, Seen, config, settled

router = sec.router  # the real router process, shut down and its log checked for tracebacks
recorder = sec.recorder  # the recording upstream

PROMPT = 5.0  # seconds: a refusal comes at once, well before the router's 15 s idle deadline


def assert_one_form(seen: Seen) -> None:
    """The head the upstream got can be read one way only (``one_form_problem``: CRLF line ends
    and nothing bare, an origin-form target, one framing header in canonical form or none), and
    an HTTP/1.1 one has exactly one Host."""
    problem = one_form_problem(seen.head)
    assert problem is None, f"{seen.head!r}: {problem}"
    if seen.line.endswith("HTTP/1.1"):
        assert len(seen.header("host")) == 1, seen.head


@dataclass(frozen=True)
class Refused:
    """The router answers ``status`` and closes; the upstream sees nothing."""

    data: bytes | tuple[bytes, ...]  # one segment, or several sent one after another
    status: int = 400


@dataclass(frozen=True)
class Forwarded:
    """The upstream gets these (path, body length) requests, once each, in order."""

    data: bytes | tuple[bytes, ...]
    requests: tuple[tuple[str, int], ...]


def post(headers: bytes, body: bytes = b"", path: bytes = b"/p") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: svc\r\n" + headers + b"\r\n" + body


def chunked(*, te: bytes = b"Transfer-Encoding: chunked\r\n", body: bytes) -> bytes:
    return post(te, body)


HIDDEN = b"0\r\n\r\n" + SMUGGLED  # a last chunk, then a request of its own
SMUGGLED_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)

CASES: dict[str, Refused | Forwarded] = {
    # Content-Length and Transfer-Encoding together, in either order.
    "cl-te": Refused(post(b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(HIDDEN),
                          HIDDEN)),
    "te-cl": Refused(post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", HIDDEN)),
    "te-cl-other-case": Refused(post(b"transfer-ENCODING: chunked\r\ncontent-length: 4\r\n",
                                     HIDDEN)),
    # Two Content-Length values: different, equal, and as one list.
    "two-cl-different": Refused(post(b"Content-Length: 0\r\nContent-Length: %d\r\n"
                                     % len(SMUGGLED), SMUGGLED)),
    "two-cl-same": Refused(post(b"Content-Length: %d\r\nContent-Length: %d\r\n"
                                % (len(SMUGGLED), len(SMUGGLED)), SMUGGLED)),
    "cl-list": Refused(post(b"Content-Length: %d, %d\r\n" % (len(SMUGGLED), len(SMUGGLED)),
                            SMUGGLED)),
    "cl-plus": Refused(post(b"Content-Length: +%d\r\n" % len(SMUGGLED), SMUGGLED)),
    "cl-hex": Refused(post(b"Content-Length: 0x%x\r\n" % len(SMUGGLED), SMUGGLED)),
    "cl-leading-zeros": Forwarded(post(b"Content-Length: 00%d\r\n" % len(SMUGGLED), SMUGGLED),
                                  (("/p", len(SMUGGLED)),)),
    "cl-plain": Forwarded(post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
                          (("/p", len(SMUGGLED)),)),
    # obs-fold: a continuation line (RFC 9112 5.2 lets a server refuse it; a proxy must).
    "obs-fold-te": Refused(post(b"X-A: 1\r\n Transfer-Encoding: chunked\r\n"
                                b"Content-Length: %d\r\n" % len(HIDDEN), HIDDEN)),
    "obs-fold-te-value": Refused(chunked(te=b"Transfer-Encoding:\r\n chunked\r\n",
                                         body=SMUGGLED_CHUNKED)),
    "obs-fold-tab": Refused(post(b"X-A: 1\r\n\tX-B: 2\r\n")),
    # Bad chunk sizes.
    "chunk-non-hex": Refused(chunked(body=b"zz\r\n" + SMUGGLED)),
    "chunk-0x": Refused(chunked(body=b"0x5\r\nhello\r\n0\r\n\r\n")),
    "chunk-negative": Refused(chunked(body=b"-5\r\nhello\r\n" + HIDDEN)),
    "chunk-overflow-64": Refused(chunked(body=b"ffffffffffffffff\r\nhello\r\n" + HIDDEN)),
    "chunk-overflow-63": Refused(chunked(body=b"8000000000000000\r\nhello\r\n" + HIDDEN)),
    "chunk-overflow-long": Refused(chunked(body=b"1" + b"0" * 16 + b"\r\nhello\r\n" + HIDDEN)),
    "chunk-size-no-crlf": Refused(chunked(body=b"5hello\r\n" + HIDDEN)),
    "chunk-data-no-crlf": Refused(chunked(body=b"5\r\nhelloXX" + HIDDEN)),
    "chunk-size-bare-lf": Refused(chunked(body=b"5\nhello\r\n" + HIDDEN)),
    "chunk-size-bare-lf-alone": Refused(chunked(body=b"zz\n")),  # no CRLF ever comes
    "chunk-size-bare-cr": Refused(chunked(body=b"5\rhello\r\n" + HIDDEN)),
    "chunk-size-space": Refused(chunked(body=b"5 5\r\nhello\r\n" + HIDDEN)),
    "chunk-size-split": Refused((chunked(body=b""), b"z", b"z\r\n")),
    "chunk-ok-smuggled-in-data": Forwarded(chunked(body=SMUGGLED_CHUNKED),
                                           (("/p", len(SMUGGLED)),)),
    # Huge heads.
    "huge-header-value": Refused(b"GET /h HTTP/1.1\r\nHost: svc\r\nX-A: " + b"a" * 70_000
                                 + b"\r\n\r\n", 431),
    "many-header-lines": Refused(b"GET /h HTTP/1.1\r\nHost: svc\r\n" + b"X-A: a\r\n" * 200
                                 + b"\r\n", 431),
    "huge-head-no-end": Refused(b"GET /h HTTP/1.1\r\nHost: svc\r\nX-A: " + b"a" * 140_000, 431),
    # Bare CR and bare LF, in a complete head and in one that never completes.
    "bare-cr-in-value": Refused(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-A: 1\rX-B: 2\r\n\r\n"),
    "bare-cr-line-ends": Refused(b"GET /x HTTP/1.1\rHost: svc\r\r"),
    "bare-cr-after-name": Refused(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-A\r: 1\r\n\r\n"),
    "bare-lf-line-ends": Refused(b"GET /x HTTP/1.1\nHost: svc\n\n"),
    "bare-lf-one-line": Refused(b"GET /x HTTP/1.1\r\nHost: svc\nX-A: 1\r\n\r\n"),
    "bare-lf-before-blank": Refused(b"GET /x HTTP/1.1\r\nHost: svc\n\r\n"),
    "bare-lf-after-method": Refused(b"GET\n /x HTTP/1.1\r\nHost: svc\r\n\r\n"),
    "bare-lf-after-name": Refused(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-A\n: 1\r\n\r\n"),
    "bare-lf-split": Refused((b"GET /x HTTP/1.1\r\n", b"Host: svc\n", b"\n")),
    "bare-lf-hides-te": Refused(post(b"X-A: 1\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n"
                                     % len(HIDDEN), HIDDEN)),
    # Transfer-Encoding other than chunked alone, and in odd case and whitespace.
    "te-chunked-identity": Refused(chunked(te=b"Transfer-Encoding: chunked, identity\r\n",
                                           body=HIDDEN)),
    "te-identity": Refused(chunked(te=b"Transfer-Encoding: identity\r\n", body=HIDDEN)),
    "te-chunked-twice": Refused(chunked(te=b"Transfer-Encoding: chunked\r\n"
                                        b"Transfer-Encoding: chunked\r\n", body=HIDDEN)),
    "te-xchunked": Refused(chunked(te=b"Transfer-Encoding: xchunked\r\n", body=HIDDEN)),
    "te-chunked-param": Refused(chunked(te=b"Transfer-Encoding: chunked;q=1\r\n", body=HIDDEN)),
    "te-space-before-colon": Refused(chunked(te=b"Transfer-Encoding : chunked\r\n", body=HIDDEN)),
    "te-vertical-tab": Refused(chunked(te=b"Transfer-Encoding: \x0bchunked\r\n", body=HIDDEN)),
    "te-nul": Refused(chunked(te=b"Transfer-Encoding: chunked\x00\r\n", body=HIDDEN)),
    "te-http10": Refused(b"POST /p HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n" + HIDDEN),
    "te-upper-case": Forwarded(chunked(te=b"Transfer-Encoding: CHUNKED\r\n",
                                       body=SMUGGLED_CHUNKED), (("/p", len(SMUGGLED)),)),
    "te-name-case-and-tab": Forwarded(chunked(te=b"tRANSFER-eNCODING:\t Chunked \t\r\n",
                                              body=SMUGGLED_CHUNKED), (("/p", len(SMUGGLED)),)),
    "te-empty-elements": Forwarded(chunked(te=b"Transfer-Encoding: , chunked ,\r\n",
                                           body=SMUGGLED_CHUNKED), (("/p", len(SMUGGLED)),)),
    # Absolute-form targets: origin form upstream, the authority as the one Host.
    "absolute-form": Forwarded(b"GET http://svc/abs?q=1 HTTP/1.1\r\nHost: other\r\n\r\n",
                               (("/abs?q=1", 0),)),
    "absolute-form-userinfo": Refused(b"GET http://u:p@svc/abs HTTP/1.1\r\nHost: svc\r\n\r\n"),
    "absolute-form-other-scheme": Refused(b"GET gopher://svc/abs HTTP/1.1\r\nHost: svc\r\n\r\n"),
    "absolute-form-no-authority": Refused(b"GET http:///abs HTTP/1.1\r\nHost: svc\r\n\r\n"),
    "two-hosts": Refused(b"GET /h HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n"),
    "host-with-path": Refused(b"GET /h HTTP/1.1\r\nHost: svc/x\r\n\r\n"),
    "no-host": Refused(b"GET /h HTTP/1.1\r\n\r\n"),
    "connect": Refused(b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n", 501),
    # HTTP/1.0: keep-alive honoured, two requests stay two (and a body without a length is none).
    "http10-keep-alive": Forwarded(
        b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        (("/a", 0), ("/b", 0)),
    ),
    "http10-cl-body": Forwarded(
        b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s"
        % (len(SMUGGLED), SMUGGLED),
        (("/a", len(SMUGGLED)),),
    ),
    # Pipelining: each request once, in order; a bad one ends the connection before the next.
    "pipelined": Forwarded(
        b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\n"
        + post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED, b"/2")
        + chunked(body=SMUGGLED_CHUNKED).replace(b"/p", b"/3")
        + b"GET /4 HTTP/1.1\r\nHost: svc\r\n\r\n",
        (("/1", 0), ("/2", len(SMUGGLED)), ("/3", len(SMUGGLED)), ("/4", 0)),
    ),
    "pipelined-after-close": Forwarded(
        b"GET /1 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n" + SMUGGLED, (("/1", 0),)
    ),
}


async def _refused(rec: Recorder, port: int, case: Refused) -> None:
    c = await Raw.open(port)
    try:
        async with asyncio.timeout(PROMPT):
            for segment in (case.data,) if isinstance(case.data, bytes) else case.data:
                await c.send(segment)
            status, body = await c.response()
            assert status == case.status, (status, body)
            assert await c.closed_by_router()
    finally:
        c.close()
    assert await settled(rec, port) == ["/after"]


async def _forwarded(rec: Recorder, port: int, case: Forwarded) -> None:
    c = await Raw.open(port)
    try:
        async with asyncio.timeout(PROMPT):
            for segment in (case.data,) if isinstance(case.data, bytes) else case.data:
                await c.send(segment)
            answers = [await c.response() for _ in case.requests]
    finally:
        c.close()
    expected = [{"path": path, "len": length} for path, length in case.requests]
    assert [(status, json.loads(body)) for status, body in answers] == [
        (200, e) for e in expected
    ]
    assert await settled(rec, port) == [path for path, _ in case.requests] + ["/after"]
    for seen in rec.seen:
        assert_one_form(seen)


@pytest.mark.parametrize("name", list(CASES))
async def test_one_request_in_one_request_out(
    router: Router, recorder: Recorder, name: str
) -> None:
    """Each ambiguous framing is refused (status, then close, nothing upstream) or forwarded
    as exactly the requests the client sent, each in one unambiguous form."""
    st = await router.client.configure(config(recorder))
    case = CASES[name]
    if isinstance(case, Refused):
        await _refused(recorder, st.port, case)
    else:
        await _forwarded(recorder, st.port, case)
    assert "/smuggled-path" not in recorder.paths()


async def test_http10_without_keep_alive_closes(router: Router, recorder: Recorder) -> None:
    """An HTTP/1.0 request without keep-alive is answered, then the router closes: a second
    request on the same bytes is never read, let alone forwarded."""
    st = await router.client.configure(config(recorder))
    c = await Raw.open(st.port)
    try:
        async with asyncio.timeout(PROMPT):
            await c.send(b"GET /only HTTP/1.0\r\n\r\n" + SMUGGLED)
            assert (await c.response())[0] == 200
            assert await c.closed_by_router()
    finally:
        c.close()
    assert await settled(recorder, st.port) == ["/only", "/after"]


async def test_a_bad_request_behind_good_ones_is_refused_in_turn(
    router: Router, recorder: Recorder
) -> None:
    """Pipelined behind a good request, a bad one gets its 400 after the good one's answer,
    then the connection closes: what followed it is never forwarded."""
    st = await router.client.configure(config(recorder))
    c = await Raw.open(st.port)
    try:
        async with asyncio.timeout(PROMPT):
            await c.send(
                b"GET /good HTTP/1.1\r\nHost: svc\r\n\r\n"
                + post(b"Content-Length: 1\r\nContent-Length: 2\r\n", b"xx")
                + SMUGGLED
            )
            assert (await c.response())[0] == 200
            assert (await c.response())[0] == 400
            assert await c.closed_by_router()
    finally:
        c.close()
    assert await settled(recorder, st.port) == ["/good", "/after"]
