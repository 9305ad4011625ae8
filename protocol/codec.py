"""Encoding and decoding: JSON on the wire, one decoder per type built once.

``decode(Type, data)`` returns a value of ``Type`` or raises ProtocolError; it never raises
anything else, whatever the bytes (property-tested). Integrations read the same JSON.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
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
    versions, a 71-character digest per slot, slot names, platform, label values). Sharing
    them halves an ObservedState or a DesiredState in memory (1.4 KB to 0.8 KB, and a
    NodeInfo 1.0 to 0.55 KB; ``tests/perf/bench_shared.py`` measures it). msgspec already
    shares dict keys and Literal values; a Struct's plan (built once per class from its field
    types) visits only the fields that can hold other strings. Struct fields are set in place
    (frozen ones too: an equal string changes neither equality nor hash); dicts and lists of
    strings are replaced by copies. Interned strings are freed with their last user (CPython
    interns mortal strings), so a unique one costs a table entry only.
    """
    try:
        return _of(value)(value)  # type: ignore[no-any-return]
    except RecursionError:  # nested deeper than the stack (hostile): equal, only less shared
        return value


Sharer = Callable[[Any], Any]


def _share(value: Any) -> Any:
    """The untyped walk, for values whose type says nothing (``Any``, unions of containers)."""
    if type(value) is str:
        return sys.intern(value)
    if isinstance(value, msgspec.Struct):
        return _of(value)(value)
    if type(value) is dict:
        return {_share(k): _share(v) for k, v in value.items()}
    if type(value) is list:
        return [_share(v) for v in value]
    return value


def _keep(value: Any) -> Any:
    return value


def _of(value: Any) -> Sharer:
    cls: Any = type(value)
    return _sharer(cls)


@cache
def _sharer(tp: Any) -> Sharer:
    """The sharer of values of ``tp``: a Struct class's plan, else the untyped walk."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _struct_sharer(msgspec.inspect.type_info(tp), set())
    return _share


def _struct_sharer(info: Any, building: set[type]) -> Sharer:
    if info.cls in building:  # a recursive type: its values walk untyped
        return lambda v: _of(v)(v)
    building.add(info.cls)
    plan = [(f.name, s) for f in info.fields if (s := _plan(f.type, building)) is not None]
    building.discard(info.cls)
    if not plan:
        return _keep
    force = msgspec.structs.force_setattr

    def share(value: Any) -> Any:
        for name, part in plan:
            old = getattr(value, name)
            if type(old) in _SCALARS:  # None, or UNSET (type_info leaves UnsetType out)
                continue
            new = part(old)
            if new is not old:
                force(value, name, new)
        return value

    return share


def _plan(t: Any, building: set[type]) -> Sharer | None:
    """How to share a value of msgspec type ``t``; None: it holds no string worth sharing."""
    mi = msgspec.inspect
    if isinstance(t, mi.StrType):
        return _intern
    if isinstance(t, _NO_STRINGS):
        return None  # no string, or one msgspec shares already (Literal values, dict keys)
    if isinstance(t, mi.StructType):
        return _struct_sharer(t, building)
    if isinstance(t, mi.DictType):
        values = _plan(t.value_type, building)
        if values is None:
            return None
        return lambda d: {k: values(v) for k, v in d.items()} if d else d
    if isinstance(t, mi.ListType):
        items = _plan(t.item_type, building)
        if items is None:
            return None
        return lambda xs: [items(x) for x in xs] if xs else xs
    if isinstance(t, mi.UnionType):
        parts = [p for x in t.types if (p := _plan(x, building)) is not None]
        if not parts:
            return None
        if len(parts) > 1:
            return _share
        only = parts[0]  # the one member with strings: the others hold none (None, UNSET, ...)
        return lambda v: (v if type(v) in _SCALARS or (type(v) is str and only is not _intern)
                          else only(v))
    return _share  # Any, tuples, sets, ...: the untyped walk (it leaves what it does not know)


_NO_STRINGS = (
    msgspec.inspect.IntType, msgspec.inspect.FloatType, msgspec.inspect.BoolType,
    msgspec.inspect.NoneType, msgspec.inspect.LiteralType, msgspec.inspect.BytesType,
    msgspec.inspect.ByteArrayType, msgspec.inspect.MemoryViewType,
)
_SCALARS = frozenset({type(None), type(msgspec.UNSET), int, float, bool})


def _intern(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


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
