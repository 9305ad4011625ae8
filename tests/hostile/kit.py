"""The kit's common parts: how tests run a property (``CI``, ``within``), hostile values, byte
mutations, and plausible JSON for any msgspec Struct from its JSON Schema (``shaped``)."""

from __future__ import annotations

import base64
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from protocol import messages

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


def raw_json_tokens() -> st.SearchStrategy[bytes]:
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
EDITS, OPS = st.integers(0, 4), st.sampled_from(["flip", "insert", "delete", "cut", "dup"])
FEW, BIT, SHORT = st.integers(1, 8), st.integers(0, 7), st.binary(min_size=1, max_size=8)
WHERE = st.floats(0, 1, exclude_max=True)
COIN, DIE4, DIE5, DIE10 = st.booleans(), st.integers(0, 3), st.integers(0, 4), st.integers(0, 9)


def mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """``data`` cut, with bytes flipped, inserted or deleted at drawn places (a few edits)."""
    for _ in range(draw(EDITS)):
        if not data:
            data = draw(SHORT)
            continue
        i = int(draw(WHERE) * len(data))
        op = draw(OPS)
        if op == "flip":
            data = data[:i] + bytes([data[i] ^ (1 << draw(BIT))]) + data[i + 1 :]
        elif op == "insert":
            data = data[:i] + draw(SHORT) + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + draw(FEW) :]
        elif op == "cut":
            data = data[:i]
        else:
            data = data[:i] + data[i : i + 64] * draw(DIE4).__add__(2) + data[i + 64 :]
    return data


# -- wire messages from their JSON Schema ----------------------------------------------------------

WIRE_STRUCTS: tuple[type[msgspec.Struct], ...] = tuple(
    t
    for _, t in inspect.getmembers(messages, inspect.isclass)
    if issubclass(t, msgspec.Struct) and t.__module__ == messages.__name__
)
REFS, DEFS = msgspec.json.schema_components(WIRE_STRUCTS)
SCHEMAS: dict[type[msgspec.Struct], dict[str, Any]] = dict(zip(WIRE_STRUCTS, REFS, strict=True))


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
def pick(options: tuple[Any, ...], binary: int = -1, text: int = -1) -> st.SearchStrategy[Any]:
    """``sampled_from(options)``, or else bytes or text up to a size; built once per options."""
    s: st.SearchStrategy[Any] = st.sampled_from(options)
    if binary >= 0:
        s = s | st.binary(max_size=binary)
    if text >= 0:
        s = s | st.text(max_size=text)
    return s


@functools.cache
def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


@functools.cache
def blob(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=size)


@functools.cache
def txt(size: int) -> st.SearchStrategy[str]:
    return st.text(max_size=size)


def spoil(value: Any, draw: Callable[[st.SearchStrategy[Any]], Any]) -> Any:
    """``value`` with one drawn place in it spoiled: a value replaced by a hostile one, a key
    dropped or an unknown key added, an element replaced or added."""
    if isinstance(value, dict) and value:
        key = draw(pick(tuple(sorted(value))))
        op = draw(pick(tuple(["replace", "drop", "add", "recurse", "recurse"])))
        value = dict(value)
        if op == "replace":
            value[key] = draw(json_values)
        elif op == "drop":
            del value[key]
        elif op == "add":
            value[draw(txt(8))] = draw(json_values)
        else:
            value[key] = spoil(value[key], draw)
        return value
    if isinstance(value, list) and value:
        i = int(draw(WHERE) * len(value))
        if draw(COIN):
            return [*value[:i], spoil(value[i], draw), *value[i + 1 :]]
        return [*value, draw(json_values)]
    return draw(json_values)


@functools.cache
def shaped(tp: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    """Plausible JSON values for ``tp`` from its schema (built once per type)."""
    if tp in SCHEMAS:
        return from_schema(SCHEMAS[tp], DEFS)
    refs, defs = msgspec.json.schema_components([tp])
    return from_schema(refs[0], defs)
