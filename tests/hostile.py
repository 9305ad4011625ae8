"""Hostile input: the fuzzing kit shared by the unit tests, the smuggling suite and the benchmark.

For every place input enters from outside, a hypothesis strategy that makes hostile input of it
(shaped like the real thing, then broken) and a *property*: a function that feeds one input to
the parser and raises AssertionError if anything but the parser's documented error escaped, or if
what it accepted is not safe to act on. The unit tests run each property over a few hundred
derandomized cases (``CI``); ``tests/perf/fuzz_inputs.py`` over 100,000 and more.

    target       entry point                              documented error      strategy
    wire         protocol.codec.decode(<each Struct>)     ProtocolError         wire_inputs
    envelope     protocol.signing.verify                  ProtocolError         envelopes
    control      the router's control-socket decoder      msgspec.DecodeError,  control_lines
                 and build_routing                        RouterConfigError
    manifest     protocol.manifest.parse_manifest         ProtocolError         manifest_texts
    bundle       protocol.bundle.safe_unpack              BundleError           bundles
    request      agent.router.http11.parse_request        HttpError             request_heads
    response     agent.router.http11.parse_response       HttpError (502)       response_heads
    chunked      agent.router.upstream.BodyReader         Broken                chunked_bodies

Wire messages are generated from the JSON Schema msgspec derives from each Struct (the one the
project publishes), so a new field is fuzzed the day it is added; then values are swapped for
hostile ones, keys dropped or added, and the bytes cut and flipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gzip
import inspect
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from agent.router.channel import Channel
from agent.router.control import REQUEST_DECODER, Configure
from agent.router.errors import Broken, HttpError, RouterConfigError
from agent.router.http11 import (
    MAX_CHUNK_SIZE,
    bare_line_end,
    client_response_head,
    parse_chunk_size,
    parse_request,
    parse_response,
    upstream_request_head,
)
from agent.router.routing import build_routing
from agent.router.upstream import BodyReader
from protocol import messages
from protocol.bundle import BundleError, Limits, safe_unpack
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.manifest import MANIFEST_NAME, Manifest, parse_manifest
from protocol.signing import generate_seed, public_key, sign, verify

# How the unit tests run every property: a fixed sequence (derandomize), no example database
# (CI writes nothing), no deadline (a loaded CI box is slow; ``within`` bounds time instead).
CI = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CASE_SECONDS = 2.0  # CPU seconds one input may take to be accepted or refused
CASE_WALL_SECONDS = 20.0  # wall-clock seconds: a case blocked on something (never CPU-bound)


def within(seconds: float, fn: Callable[[], object]) -> None:
    """Run ``fn``; AssertionError if it used more than ``seconds`` of CPU (a loop that does not
    end, or nearly) or blocked for ``CASE_WALL_SECONDS``. CPU time, not wall time: a busy or
    shared machine must not fail a case that did nothing wrong."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    assert cpu < seconds, f"one input took {cpu:.2f} CPU seconds (bound {seconds}s)"
    assert wall < CASE_WALL_SECONDS, f"one input blocked for {wall:.1f}s"


# -- generic hostile values ------------------------------------------------------------------------

HOSTILE_TEXT = [
    "", " ", "\x00", "\r\n", "\n", "\ud800", "..", "../..", "/", "a" * 5000, "\u202e", "%00",
    "\x1b[2J", "${HOME}", "$(reboot)", "; rm -rf /", "é", "日本", "\ufeff",
]
HOSTILE_NUMBERS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
HOSTILE_FLOATS = ["1e308", "1e309", "-1e309", "-0.0", "1e-400", "0.1e1"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from(HOSTILE_NUMBERS)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(HOSTILE_TEXT)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(HOSTILE_TEXT), children, max_size=4),
    max_leaves=12,
)


def _raw_json_tokens() -> st.SearchStrategy[bytes]:
    """JSON text that json.dumps never writes: huge or odd numbers, deep nesting, bad escapes."""
    return st.sampled_from(
        [
            b"[" * 10_000 + b"]" * 10_000,
            b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
            b"9" * 5_000,
            b"-" + b"9" * 400 + b".5e-99999",
            b'"\\ud800"',
            b'"\\u0000"',
            b'"\xff\xfe"',
            b"1e999999999999",
            b"NaN",
            b"Infinity",
            b"[1,]",
            b'{"a":1,"a":2}',
            b"\xef\xbb\xbf{}",
        ]
        + [v.encode() for v in HOSTILE_FLOATS]
    )


# Strategies are built once here: building them inside each draw costs more than the draw.
_EDITS, _OPS = st.integers(0, 4), st.sampled_from(["flip", "insert", "delete", "cut", "dup"])
_FEW, _BIT, _SHORT = st.integers(1, 8), st.integers(0, 7), st.binary(min_size=1, max_size=8)
_WHERE = st.floats(0, 1, exclude_max=True)
_COIN, _DIE4, _DIE5, _DIE10 = st.booleans(), st.integers(0, 3), st.integers(0, 4), st.integers(0, 9)


def mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """``data`` cut, with bytes flipped, inserted or deleted at drawn places (a few edits)."""
    for _ in range(draw(_EDITS)):
        if not data:
            data = draw(_SHORT)
            continue
        i = int(draw(_WHERE) * len(data))
        op = draw(_OPS)
        if op == "flip":
            data = data[:i] + bytes([data[i] ^ (1 << draw(_BIT))]) + data[i + 1 :]
        elif op == "insert":
            data = data[:i] + draw(_SHORT) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + draw(_FEW) :]
        elif op == "cut":
            data = data[:i]
        else:
            data = data[:i] + data[i : i + 64] * draw(_DIE4).__add__(2) + data[i + 64 :]
    return data


# -- wire messages from their JSON Schema ----------------------------------------------------------

WIRE_STRUCTS: tuple[type[msgspec.Struct], ...] = tuple(
    t
    for _, t in inspect.getmembers(messages, inspect.isclass)
    if issubclass(t, msgspec.Struct) and t.__module__ == messages.__name__
)
_REFS, _DEFS = msgspec.json.schema_components(WIRE_STRUCTS)
SCHEMAS: dict[type[msgspec.Struct], dict[str, Any]] = dict(zip(WIRE_STRUCTS, _REFS, strict=True))


def from_schema(
    schema: dict[str, Any], defs: dict[str, Any], depth: int = 0
) -> st.SearchStrategy[Any]:
    """Plausible JSON for ``schema`` (the subset msgspec writes), hostile now and then."""
    hostile = json_values if depth < 6 else st.none()
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(defs[name], defs, depth + 1))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, depth + 1) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | hostile
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        props = schema["properties"]
        required = set(schema.get("required", ()))
        fields = {k: from_schema(v, defs, depth + 1) for k, v in props.items()}
        return st.fixed_dictionaries(
            {k: s for k, s in fields.items() if k in required},
            optional={k: s for k, s in fields.items() if k not in required},
        )
    if kind == "object":
        values = from_schema(schema.get("additionalProperties", {}), defs, depth + 1)
        return st.dictionaries(st.text(max_size=10) | st.sampled_from(HOSTILE_TEXT), values,
                               max_size=3)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs, depth + 1), max_size=3)
    if kind == "string":
        if schema.get("contentEncoding") == "base64":
            return st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
        return st.text(max_size=20) | st.sampled_from(HOSTILE_TEXT)
    if kind == "integer":
        return st.integers(-(2**63), 2**64) | st.sampled_from(HOSTILE_NUMBERS)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**70), 2**70)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return hostile


@functools.cache
def _one_of(options: tuple[Any, ...], binary: int = -1, text: int = -1) -> st.SearchStrategy[Any]:
    """``sampled_from(options)``, or else bytes or text up to a size; built once per options."""
    s: st.SearchStrategy[Any] = st.sampled_from(options)
    if binary >= 0:
        s = s | st.binary(max_size=binary)
    if text >= 0:
        s = s | st.text(max_size=text)
    return s


@functools.cache
def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


@functools.cache
def _bin(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=size)


@functools.cache
def _txt(size: int) -> st.SearchStrategy[str]:
    return st.text(max_size=size)


def _spoil(value: Any, draw: Callable[[st.SearchStrategy[Any]], Any]) -> Any:
    """``value`` with one drawn place in it spoiled: a value replaced by a hostile one, a key
    dropped or an unknown key added, an element replaced or added."""
    if isinstance(value, dict) and value:
        key = draw(_one_of(tuple(sorted(value))))
        op = draw(_one_of(tuple(["replace", "drop", "add", "recurse", "recurse"])))
        value = dict(value)
        if op == "replace":
            value[key] = draw(json_values)
        elif op == "drop":
            del value[key]
        elif op == "add":
            value[draw(_txt(8))] = draw(json_values)
        else:
            value[key] = _spoil(value[key], draw)
        return value
    if isinstance(value, list) and value:
        i = int(draw(_WHERE) * len(value))
        if draw(_COIN):
            return [*value[:i], _spoil(value[i], draw), *value[i + 1 :]]
        return [*value, draw(json_values)]
    return draw(json_values)


@functools.cache
def shaped(tp: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    """Plausible JSON values for ``tp`` from its schema (built once per type)."""
    if tp in SCHEMAS:
        return from_schema(SCHEMAS[tp], _DEFS)
    refs, defs = msgspec.json.schema_components([tp])
    return from_schema(refs[0], defs)


@st.composite
def wire_inputs(draw: Any, tp: type[msgspec.Struct]) -> bytes:
    """Bytes for a decoder of ``tp``: schema-shaped JSON, spoiled, or broken at the byte level."""
    how = draw(_one_of(tuple(["shaped", "spoiled", "mutated", "raw", "bytes"])))
    if how == "raw":
        return bytes(draw(_raw_json_tokens()))
    if how == "bytes":
        return bytes(draw(_bin(300)))
    value = draw(shaped(tp))
    if how != "shaped":
        value = _spoil(value, draw)
    data = json.dumps(value).encode()
    return mutate(data, draw) if how == "mutated" else data


def check_wire(tp: type[msgspec.Struct], data: bytes) -> None:
    """Property: a decoder yields a ``tp`` or raises ProtocolError; nothing else, promptly."""

    def run() -> None:
        try:
            value = decode(tp, data)
        except ProtocolError:
            return
        assert isinstance(value, tp)
        encode(value)  # what was accepted can be written back (no value msgspec cannot encode)

    within(CASE_SECONDS, run)


# -- signed envelopes ------------------------------------------------------------------------------

SEED = generate_seed()
TRUSTED = frozenset({public_key(SEED)})
GENUINE = messages.DesiredState(
    fleet="f", node="n1", service="hello", generation=5,
    slots={"a": messages.ReleaseRef(service="hello", version="1.0.0",
                                    digest="sha256:" + "ab" * 32, size=1)},
    weights={"a": 100},
)
GENUINE_ENVELOPE = sign(SEED, GENUINE, term=3)


@st.composite
def envelopes(draw: Any) -> bytes:
    """A genuine signed envelope with a field spoiled, or its JSON broken."""
    value = msgspec.to_builtins(GENUINE_ENVELOPE)
    how = draw(_one_of(tuple(["spoiled", "mutated", "genuine", "payload"])))
    if how == "spoiled":
        value = _spoil(value, draw)
    elif how == "payload":
        inner = _spoil(msgspec.to_builtins(GENUINE), draw)
        value["payload"] = base64.b64encode(json.dumps(inner).encode()).decode()
    data = json.dumps(value).encode()
    return mutate(data, draw) if how == "mutated" else data


def check_envelope(data: bytes) -> None:
    """Property: an envelope opens to exactly the genuine state or is refused with ProtocolError."""

    def run() -> None:
        try:
            env = decode(messages.SignedEnvelope, data)
            desired = verify(env, TRUSTED, fleet="f", node="n1", service="hello",
                             min_generation=4, min_term=3)
        except ProtocolError:
            return
        assert desired == GENUINE, f"a tampered envelope was accepted: {desired}"

    within(CASE_SECONDS, run)


# -- the router's control socket -------------------------------------------------------------------


@st.composite
def control_lines(draw: Any) -> bytes:
    """A control-socket line: a configure with a schema-shaped config, spoiled, or bytes."""
    how = draw(_one_of(tuple(["configure", "spoiled", "mutated", "bytes"])))
    if how == "bytes":
        return bytes(draw(_bin(200)))
    value = draw(shaped(Configure))
    value["type"] = "configure"
    if how != "configure":
        value = _spoil(value, draw)
    data = json.dumps(value).encode()
    return mutate(data, draw) if how == "mutated" else data


def check_control(line: bytes) -> None:
    """Property: the control decoder raises only msgspec.DecodeError, and a decoded config is
    built into a routing or refused with RouterConfigError."""

    def run() -> None:
        try:
            request = REQUEST_DECODER.decode(line)
        except msgspec.DecodeError:
            return
        if isinstance(request, Configure):
            with contextlib.suppress(RouterConfigError):
                build_routing(request.config)

    within(CASE_SECONDS, run)


# -- manifests -------------------------------------------------------------------------------------

VALID_MANIFEST = """\
name = "hello"
version = "2.0.0"
port = 8080
command = ["python3", "app.py"]
env = { GREETING = "hi" }
[health]
http = "/healthz"
interval = "500ms"
timeout = "1s"
healthy_threshold = 2
start_timeout = "30s"
[stop]
drain = "2s"
[hooks]
pre_start = ["./migrate"]
"""
DURATIONS = ["500ms", "0", "1m30s", "1e5s", "-1s", "\u0665s", "1.5.5s", "9" * 400 + "h", "", " 1s "]


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (lone surrogates aside)
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '""'


def to_toml(doc: dict[str, Any]) -> str:
    """TOML text for a dict of plain values and one level of tables."""
    top = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [
        f"[{_toml_key(k)}]\n"
        + "\n".join(f"{_toml_key(a)} = {_toml_value(b)}" for a, b in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top + tables) + "\n"


@st.composite
def manifest_texts(draw: Any) -> str:
    """fleetwave.toml text: schema-shaped (durations as strings), spoiled, mutated, or junk."""
    how = draw(_one_of(tuple(["shaped", "spoiled", "mutated", "junk"])))
    if how == "junk":
        return str(draw(_txt(300)))
    if how == "mutated":
        data = mutate(VALID_MANIFEST.encode(), draw)
        return data.decode("utf-8", "replace")
    if how == "shaped":  # every key the Struct has, values of its types, durations as text
        doc = draw(shaped(Manifest))
        for table in ("health", "stop", "hooks"):
            section = doc.get(table)
            if isinstance(section, dict):
                for key in list(section):
                    if key.endswith(("interval", "timeout", "drain")):
                        section[key] = draw(_one_of(tuple(DURATIONS)))
        return to_toml(doc)
    doc = tomllib.loads(VALID_MANIFEST)  # a valid manifest with one to three places spoiled
    for _ in range(draw(_ints(1, 3))):
        doc = _spoil(doc, draw)
    return to_toml(doc)


def check_manifest(text: str) -> None:
    """Property: a manifest parses into one an agent can act on, or raises ProtocolError.

    Acting on it means: every argv and env string can be passed to exec (no NUL), the health
    path can go on a request line as it is (visible ASCII, no space), thresholds and durations
    are usable numbers."""

    def run() -> None:
        try:
            m = parse_manifest(text)
        except ProtocolError:
            return
        argvs = [m.command, m.health.exec or [], m.hooks.pre_start or [], m.hooks.validate or []]
        for arg in (a for argv in argvs for a in argv):
            assert arg and "\0" not in arg, f"argv element {arg!r} cannot be exec'd"
        for key, value in m.env.items():
            assert key and "=" not in key and "\0" not in key + value, f"env {key!r}={value!r}"
        if m.health.http is not None:
            assert re.fullmatch(r"/[!-~]*", m.health.http), f"health.http {m.health.http!r}"
        assert m.port is None or 1 <= m.port <= 65535
        for seconds in (m.health.interval, m.health.timeout, m.health.start_timeout,
                        m.stop.drain, m.stop.timeout, m.hooks.timeout):
            assert 0 <= seconds < float("inf")

    within(CASE_SECONDS, run)


# -- bundles ---------------------------------------------------------------------------------------

MEMBER_NAMES = [
    "app.py", "bin/run", "a/b/c.txt", "../escape", "/etc/passwd", "./ok", "a/../../x", "a//b",
    "dup", "dup", "link", "link/inside", ".", "", "a\x00b", "x" * 300, "é/ü", "a/",
    "fleetwave.toml",
    "dir/", "\\..\\win",
]
LINK_TARGETS = ["app.py", "../..", "/etc", "link", "a/b", "nope", "", "dir/../../x", "." ]
TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"x"]
SMALL = Limits(max_entries=40, max_bytes=64 * 1024, max_path=200)


@st.composite
def bundles(draw: Any) -> bytes:
    """A .tar.gz with hostile members (names, types, links, modes, sizes), or one broken after."""
    fmt = draw(_one_of(tuple([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if draw(_ints(0, 9)):  # most bundles carry a manifest, so unpacking gets far
            manifest = VALID_MANIFEST.encode() if draw(_ints(0, 3)) else draw(_bin(200))
            info = tarfile.TarInfo(MANIFEST_NAME)
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
        for _ in range(draw(_ints(0, 6))):
            name = draw(_one_of(tuple(MEMBER_NAMES), text=30))
            info = tarfile.TarInfo(name)
            info.type = draw(_one_of(tuple(TYPES)))
            info.mode = draw(_ints(0, 0o7777))
            info.linkname = draw(_one_of(tuple(LINK_TARGETS), text=20))
            data = draw(_bin(64))
            info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.CONTTYPE) else 0
            lies = draw(_ints(0, 9)) == 0
            if lies:  # a size that lies: the header is written by hand, tarfile would not
                info.size = draw(_one_of(tuple([0, 1, 10**6, 2**33 - 1])))
            info.mtime = draw(_one_of(tuple([0, -1, 2**33 - 1])))
            if fmt == tarfile.PAX_FORMAT and draw(_ints(0, 4)) == 0:
                info.pax_headers = {
                    draw(_one_of(tuple(["GNU.sparse.map", "path", "linkpath", "size", "x"]))):
                        draw(_txt(20))
                }
            try:
                if lies:
                    raw = info.tobuf(fmt, "utf-8", "surrogateescape")
                    raw += data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
                    tar.fileobj.write(raw)
                    tar.offset += len(raw)
                else:
                    tar.addfile(info, io.BytesIO(data))
            except (ValueError, tarfile.TarError, UnicodeError, OverflowError):
                pass  # tarfile refused to write it: the next one
    data = buf.getvalue()
    if draw(_ints(0, 3)) == 0:
        data = mutate(data, draw)
    gz = gzip.compress(data, mtime=0)
    if draw(_ints(0, 7)) == 0:
        gz = mutate(gz, draw)
    return gz


def check_bundle(data: bytes, workdir: Path) -> None:
    """Property: unpacking refuses with BundleError, leaving nothing behind, or writes a tree of
    plain files, directories and in-tree symlinks only, modes normalised."""
    dest = workdir / "release"
    before = set(os.listdir(workdir))

    def run() -> None:
        try:
            safe_unpack(data, dest, limits=SMALL)
        except BundleError:
            assert not dest.exists(), "a refused bundle left its destination behind"
            assert set(os.listdir(workdir)) == before, "a refused bundle left files behind"
            return
        root = dest.resolve()
        for path in [dest, *dest.rglob("*")]:
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                target = os.readlink(path)
                assert not os.path.isabs(target), f"{path}: absolute link {target!r}"
                assert path.resolve().is_relative_to(root), f"{path}: link out of the tree"
            else:
                assert stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode), f"{path}: kind"
                assert st_.st_mode & 0o7022 == 0, f"{path}: mode {oct(st_.st_mode)}"
        shutil.rmtree(dest)

    within(CASE_SECONDS, run)


# -- the router's HTTP/1.1 parser ------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"CONNECT", b"G ET", b"GET\n", b"",
           b"\x00"]
TARGETS = [b"/", b"/p?q=1", b"*", b"http://svc/x", b"HTTP://a:1?x", b"https://u@h/", b"//x",
           b"/a b", b"/\r\n", b"x", b"http:///", b"/%00"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1\n", b"http/1.1", b""]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"TE",
         b"X-Forwarded-For", b"Keep-Alive", b"Upgrade", b"transfer-encoding", b"Host ",
         b" Host", b"X-A\n", b"Content-Length\r", b"X-A"]
VALUES = [b"svc", b"chunked", b"Chunked", b" chunked ", b"chunked, identity", b"identity",
          b"gzip, chunked", b"chunked, chunked", b",chunked,", b"0", b"5", b"005", b"5, 5", b"-1",
          b"+5", b"0x5", b"9" * 20, b"close", b"keep-alive", b"Content-Length", b"host",
          b"100-continue", b"\tx", b"a\rb", b"a\nb", b"a\x00b", b"svc:8080", b"[::1]:1", b"a/b"]
LINE_ENDS = [b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n", b" \r\n", b"\n\r"]


@st.composite
def request_heads(draw: Any) -> bytes:
    """A request head built from hostile parts (methods, targets, framing headers, line ends,
    obs-fold), possibly mutated at the byte level, or plain bytes."""
    if draw(_ints(0, 9)) == 0:
        return bytes(draw(_bin(200)))
    end = lambda: draw(_one_of(tuple(LINE_ENDS)))  # noqa: E731
    sp = lambda: draw(_one_of(tuple([b" "] * 8 + [b"  ", b"\t", b""])))  # noqa: E731
    parts = [
        draw(_one_of(tuple(METHODS), binary=6)), sp(),
        draw(_one_of(tuple(TARGETS), binary=10)), sp(),
        draw(_one_of(tuple(VERSIONS))), end(),
    ]
    for _ in range(draw(_ints(0, 6))):
        fold = draw(_one_of(tuple([b""] * 8 + [b" ", b"\t"])))
        name = draw(_one_of(tuple(NAMES), binary=8))
        value = draw(_one_of(tuple(VALUES), binary=12))
        colon = draw(_one_of(tuple([b": "] * 6 + [b":", b" : ", b":\t"])))
        parts += [fold, name, colon, value, end()]
    parts.append(draw(_one_of(tuple([b"\r\n"] * 6 + [b"\n", b"", b"\r\n\r\n"]))))
    head = b"".join(parts)
    return mutate(head, draw) if draw(_ints(0, 4)) == 0 else head


_FIELD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ ]?[^\x00-\x08\x0a-\x1f\x7f]*")


def one_form_problem(head: bytes) -> str | None:
    """Why ``head`` (going upstream) could be read two ways, or None: CRLF line ends only, an
    origin-form target, at most one Host, one framing header in canonical form."""
    if not head.endswith(b"\r\n\r\n"):
        return "does not end with CRLF CRLF"
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in ln or b"\n" in ln for ln in lines):
        return "a bare CR or LF"
    request_line = lines[0].split(b" ")
    if len(request_line) != 3:
        return "request line not three parts"
    _, target, _ = request_line
    if not (target.startswith(b"/") or target == b"*"):
        return f"target {target!r} not origin-form"
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if not _FIELD.fullmatch(line):
            return f"not a field line: {line!r}"
        name, _, value = line.partition(b":")
        fields.setdefault(name.lower(), []).append(value.strip())
    if len(fields.get(b"host", [])) > 1:
        return "more than one Host"
    te, cl = fields.get(b"transfer-encoding", []), fields.get(b"content-length", [])
    if te and cl:
        return "both Transfer-Encoding and Content-Length"
    if len(te) > 1 or len(cl) > 1:
        return "a framing header twice"
    if te and (te[0] != te[0].lower() or not te[0].endswith(b"chunked")):
        return f"Transfer-Encoding {te[0]!r} not canonical"
    if cl and not (cl[0].isdigit() and cl[0] == b"%d" % int(cl[0])):
        return f"Content-Length {cl[0]!r} not canonical"
    return None


def check_request(head: bytes) -> None:
    """Property: a head is refused with HttpError (400/431/501/505), or accepted only if it has
    no bare CR or LF, and what goes upstream is in one form and parses back to the same request."""

    def run() -> None:
        try:
            req = parse_request(head)
        except HttpError as exc:
            assert exc.status in (400, 431, 501, 505), exc.status
            return
        assert not bare_line_end(head), "a head with a bare CR or LF was accepted"
        out = upstream_request_head(req, "192.0.2.1")
        problem = one_form_problem(out)
        assert problem is None, f"upstream head {out!r}: {problem}"
        again = parse_request(out)
        assert (again.method, again.target, again.content_length, again.chunked) == (
            req.method, req.target, req.content_length, req.chunked
        ), out

    within(CASE_SECONDS, run)


STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 204 No", b"HTTP/1.1 100 Continue", b"HTTP/1.1 2000",
                b"HTTP/1.1 200", b"HTTP/1.1 200 OK\n", b"HTTP/1.1 304 \r", b"garbage",
                b"HTTP/1.1 101 x"]


@st.composite
def response_heads(draw: Any) -> bytes:
    """A response head from hostile parts, or bytes."""
    if draw(_ints(0, 9)) == 0:
        return bytes(draw(_bin(200)))
    parts = [draw(_one_of(tuple(STATUS_LINES), binary=20)), b"\r\n"]
    for _ in range(draw(_ints(0, 5))):
        parts += [draw(_one_of(tuple(NAMES), binary=8)), b": ",
                  draw(_one_of(tuple(VALUES), binary=12)),
                  draw(_one_of(tuple(LINE_ENDS)))]
    head = b"".join([*parts, b"\r\n"])
    return mutate(head, draw) if draw(_ints(0, 4)) == 0 else head


def check_response(head: bytes) -> None:
    """Property: a response head is refused with HttpError(502) or relayed as a head with CRLF
    line ends only and a three-digit status."""

    def run() -> None:
        for method in ("GET", "HEAD"):
            try:
                resp = parse_response(head, method)
            except HttpError as exc:
                assert exc.status == 502, exc.status
                return
            for keep, http10 in ((True, False), (False, True)):
                out = client_response_head(resp, keep_alive=keep, http10=http10)
                assert out.endswith(b"\r\n\r\n") and not bare_line_end(out), out
                assert re.match(rb"HTTP/1\.[01] [0-9]{3}[ \r]", out), out

    within(CASE_SECONDS, run)


@st.composite
def chunked_bodies(draw: Any) -> bytes:
    """A chunked body with hostile size lines, data that lies about its size, and trailers."""
    if draw(_ints(0, 9)) == 0:
        return bytes(draw(_bin(200)))
    parts = []
    for _ in range(draw(_ints(0, 4))):
        data = draw(_bin(20))
        size = draw(_one_of(tuple([b"%x" % len(data)] * 4 + [
            b"%X" % len(data), b"0%x" % len(data), b"-1", b"zz", b"ffffffffffffffff", b"0x1",
            b"8000000000000000", b"7fffffffffffffff", b"1" * 17, b"", b" 1", b"1 ",
        ])))
        ext = draw(_one_of(tuple([b"", b";a=b", b';a="x\\"y"', b";", b"; a", b";a=\"", b";\x00"])))
        parts += [size, ext, draw(_one_of(tuple(LINE_ENDS))), data,
                  draw(_one_of(tuple(LINE_ENDS)))]
    parts.append(draw(_one_of(tuple([b"0\r\n", b"0;x\r\n", b"0\n", b"00\r\n", b""]))))
    for _ in range(draw(_ints(0, 2))):
        parts += [draw(_one_of(tuple(NAMES))), b": ", draw(_one_of(tuple(VALUES))),
                  draw(_one_of(tuple(LINE_ENDS)))]
    parts.append(draw(_one_of(tuple([b"\r\n"] * 4 + [b"\n", b""]))))
    body = b"".join(parts)
    return mutate(body, draw) if draw(_ints(0, 4)) == 0 else body


def strict_chunks(data: bytes) -> bytes:
    """Decode a chunked body written in the router's canonical form only; ValueError otherwise."""
    out = b""
    while True:
        line, sep, data = data.partition(b"\r\n")
        if not sep or not re.fullmatch(rb"0|[1-9a-f][0-9a-f]*", line):
            raise ValueError(f"size line {line!r} not canonical")
        size = int(line, 16)
        if size == 0:
            if data != b"\r\n":
                raise ValueError("trailers or bytes after the last chunk")
            return out
        if data[size : size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        out, data = out + data[:size], data[size + 2 :]


def check_chunked(body: bytes, loop: asyncio.AbstractEventLoop) -> None:
    """Property: a chunked body is refused with Broken, or relayed in canonical chunked form
    (size lines in lower-case hex, no extensions, no trailers) that any parser reads alike."""

    async def relay() -> bytes:
        channel = Channel(1 << 20)
        channel.buf += body
        channel.eof = True
        reader = BodyReader(channel, "chunked", 0, 5.0)
        out = b""
        while piece := await reader.read():
            out += piece
        return out

    def run() -> None:
        try:
            out = loop.run_until_complete(relay())
        except Broken:
            return
        strict_chunks(out)

    within(CASE_SECONDS, run)


def check_chunk_line(line: bytes) -> None:
    """Property: a chunk-size line gives a size in range or raises HttpError(400)."""
    try:
        size = parse_chunk_size(line)
    except HttpError as exc:
        assert exc.status == 400
        return
    assert 0 <= size <= MAX_CHUNK_SIZE and not bare_line_end(line[:-2])
