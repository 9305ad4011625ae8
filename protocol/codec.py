"""Encoding and decoding: JSON on the wire, one decoder per type built once.

``decode(Type, data)`` returns a value of ``Type`` or raises ProtocolError; it never raises
anything else, whatever the bytes (property-tested). Integrations read the same JSON.
"""

from __future__ import annotations

import re
import sys
from functools import cache
from typing import Any, TypeVar

import msgspec

from protocol.errors import ProtocolError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    """Encode a Struct (or plain data) as compact JSON bytes."""
    return _encoder.encode(value)


@cache
def _decoder(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)


def decode(tp: type[T], data: bytes | bytearray | memoryview | str) -> T:
    """Decode JSON ``data`` into ``tp``; any failure becomes one ProtocolError naming the type."""
    try:
        result: T = _decoder(tp).decode(data)  # type: ignore[arg-type]  # types are hashable
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {_name(tp)}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {_name(tp)}: {exc}") from None
    except (UnicodeDecodeError, RecursionError) as exc:  # str input that is not valid text
        raise ProtocolError(f"malformed {_name(tp)}: {exc}") from None
    return result


def shared(value: T) -> T:
    """``value`` with its strings shared with equal ones already in memory (``sys.intern``).

    For what a coordinator holds a copy of per node, by the tens of thousands: each decode
    makes its own copy of every string, though across a fleet nearly all are equal (service,
    versions, a 71-character digest per slot, slot names, states, platform, labels). Sharing
    them halves an ObservedState or a DesiredState in memory (1.4 KB to 0.8 KB, and a
    NodeInfo 1.0 to 0.65 KB; ``tests/perf/bench_shared.py`` measures it).
    Struct fields are set in place (frozen ones too: sharing an equal string changes neither
    equality nor hash); dicts and lists are replaced by copies. Interned strings are freed with
    their last user (CPython interns mortal strings), so unique ones cost a table entry only.
    """
    try:
        return _share(value)  # type: ignore[no-any-return]
    except RecursionError:  # nested deeper than the stack (hostile): equal, only less shared
        return value


def _share(value: Any) -> Any:
    if type(value) is str:
        return sys.intern(value)
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            old = getattr(value, name)
            new = _share(old)
            if new is not old:
                msgspec.structs.force_setattr(value, name, new)
        return value
    if type(value) is dict:
        return {_share(k): _share(v) for k, v in value.items()}
    if type(value) is list:
        return [_share(v) for v in value]
    return value


def convert(tp: type[T], obj: Any, *, what: str | None = None) -> T:
    """Convert already-parsed config (a dict from TOML) into ``tp`` strictly.

    Errors speak of keys, as a person editing the file sees them: ``unknown key 'health.bar'``.
    """
    try:
        result: T = msgspec.convert(obj, tp, strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{what or _name(tp)}: {config_message(str(exc))}") from None
    return result


_WHERE = r"(?: - at `\$\.?(?P<at>[^`]*)`)?"
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`" + _WHERE)
_MISSING = re.compile(r"Object missing required field `(?P<key>[^`]*)`" + _WHERE)
_AT = re.compile(r"^(?P<msg>.*) - at `\$\.?(?P<at>[^`]*)`$")


def config_message(text: str) -> str:
    """Turn a msgspec validation message into one about config keys."""
    if m := _UNKNOWN.fullmatch(text):
        key = ".".join(p for p in (m["at"], m["key"]) if p)
        return f"unknown key '{key}'; remove it or check its spelling"
    if m := _MISSING.fullmatch(text):
        key = ".".join(p for p in (m["at"], m["key"]) if p)
        return f"missing required key '{key}'"
    if m := _AT.fullmatch(text):
        return f"key '{m['at']}': {m['msg'].lower()}"
    return text


def to_builtins(value: Any) -> Any:
    """Plain dicts and lists of a Struct, for JSON output and tests."""
    return msgspec.to_builtins(value)


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
