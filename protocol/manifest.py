"""The bundle manifest, ``fleetwave.toml`` at the root of every release bundle.

A config Struct: unknown keys are refused by name, durations are written ``500ms``/``30s``/``2m``
and parsed into seconds here, every problem is one ProtocolError that names the key.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from protocol.codec import convert
from protocol.durations import parse_duration
from protocol.errors import ProtocolError
from protocol.expand import check_argv
from protocol.subjects import check_name

MANIFEST_NAME = "fleetwave.toml"
_PROBE_PATH = re.compile(r"/[!-~]*")  # origin-form: "/" then visible ASCII, no space
# The shortest probe period taken: an exec probe is a process started each time, and one every
# microsecond ("0.001ms" was accepted) is a fork bomb of the agent's own making.
MIN_PROBE_INTERVAL = 0.01


class HealthConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    http: str | None = None
    tcp: bool = False
    exec: list[str] | None = None
    interval: float = 0.5
    # Until the slot is first healthy, probe this often instead (Docker's --start-interval): a
    # new slot is found ready quickly while a long-running one is probed at ``interval``.
    start_interval: float | None = None
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    start_timeout: float = 30.0
    # A slot that was healthy and has failed its probes for this long is restarted, make-before-
    # break (agent.reconcile: "Self-healing"); 0 turns it off. On by default: the slot already
    # has no traffic and the restart never removes capacity, while a hung process left alone
    # keeps a node at "no healthy slot" for ever. 30 s is ten times the default time to turn
    # unhealthy: a GC pause or a brief dependency blip heals by itself first.
    restart_after: float = 30.0


class StopConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    drain: float = 2.0
    timeout: float = 10.0


class HooksConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pre_start: list[str] | None = None
    validate: list[str] | None = None
    timeout: float = 60.0


class Manifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    version: str
    command: list[str]
    port: int | None = None
    env: dict[str, str] = {}
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    stop: StopConfig = msgspec.field(default_factory=StopConfig)
    hooks: HooksConfig = msgspec.field(default_factory=HooksConfig)


_DURATIONS = {
    "health": ("interval", "start_interval", "timeout", "start_timeout", "restart_after"),
    "stop": ("drain", "timeout"),
    "hooks": ("timeout",),
}


def parse_manifest(text: str, *, source: str = MANIFEST_NAME) -> Manifest:
    """Parse manifest TOML text; raise ProtocolError saying which key is wrong and why."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProtocolError(f"{source}: not valid TOML: {exc}") from None
    return manifest_from_dict(raw, source=source)


def manifest_from_dict(raw: dict[str, Any], *, source: str = MANIFEST_NAME) -> Manifest:
    data = dict(raw)
    for table, keys in _DURATIONS.items():
        section = data.get(table)
        if not isinstance(section, dict):
            continue
        section = dict(section)
        for key in keys:
            if key in section:
                value = section[key]
                if isinstance(value, str):
                    section[key] = parse_duration(value, what=f"{source}: {table}.{key}")
                else:
                    raise ProtocolError(
                        f"{source}: {table}.{key} must be a duration string like '500ms' or '30s'"
                    )
        data[table] = section
    manifest = convert(Manifest, data, what=source)
    _check(manifest, source)
    return manifest


def load_manifest(path: Path) -> Manifest:
    """Read and parse a manifest file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot read manifest: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ProtocolError(f"{path}: manifest is not UTF-8 text") from None
    return parse_manifest(text, source=str(path))


def _check(m: Manifest, source: str) -> None:
    try:
        check_name("service", m.name)
    except ProtocolError as exc:
        raise ProtocolError(f"{source}: name: {exc}") from None
    if len(m.version) > 64:  # shown cut: a long value would bury the message
        raise ProtocolError(
            f"{source}: version is {len(m.version)} characters; at most 64 "
            f"({m.version[:20]!r}...); write a short one, e.g. 2.0.0"
        )
    if not m.version or not all(c.isalnum() or c in ".-_+" for c in m.version):
        raise ProtocolError(
            f"{source}: version {m.version!r} is not allowed: use letters, digits and '.-_+'"
        )
    if not m.command or not all(isinstance(a, str) and a for a in m.command):
        raise ProtocolError(f"{source}: command must be a non-empty list of arguments")
    # exec refuses a NUL in any argument or environment string: refuse it here, naming the key,
    # rather than let the agent fail to start the slot.
    for key, argv in (("command", m.command), ("health.exec", m.health.exec),
                      ("hooks.pre_start", m.hooks.pre_start), ("hooks.validate", m.hooks.validate)):
        if argv is not None and any("\0" in a for a in argv):
            raise ProtocolError(f"{source}: {key} has an argument with a NUL character")
        if argv is not None and not all(argv):
            raise ProtocolError(f"{source}: {key} has an empty argument; remove it")
        if argv is not None:
            try:
                check_argv(argv, key=key, has_port=m.port is not None)
            except ProtocolError as exc:
                raise ProtocolError(f"{source}: {exc}") from None
    if m.port is not None and not 1 <= m.port <= 65535:
        raise ProtocolError(f"{source}: port {m.port} is not between 1 and 65535")
    probes = [m.health.http is not None, m.health.tcp, m.health.exec is not None]
    if sum(probes) > 1:
        raise ProtocolError(f"{source}: [health] takes one of http, tcp or exec, not several")
    if m.health.http is not None and not _PROBE_PATH.fullmatch(m.health.http):
        # The path goes on the probe's request line as it is: a space, CR or LF would split it.
        raise ProtocolError(
            f"{source}: health.http must be a path starting with '/' of printable ASCII "
            "without spaces (percent-encode anything else)"
        )
    if m.health.exec is not None and not m.health.exec:
        raise ProtocolError(f"{source}: health.exec must be a non-empty list of arguments")
    if (m.health.http is not None or m.health.tcp) and m.port is None:
        raise ProtocolError(f"{source}: an http or tcp health check needs a port")
    for key in ("healthy_threshold", "unhealthy_threshold"):
        if getattr(m.health, key) < 1:
            raise ProtocolError(f"{source}: health.{key} must be at least 1")
    if m.health.interval < MIN_PROBE_INTERVAL or m.health.timeout <= 0:
        raise ProtocolError(f"{source}: health.interval must be at least "
                            f"{MIN_PROBE_INTERVAL * 1000:g}ms and health.timeout above 0")
    if m.health.start_interval is not None and m.health.start_interval < MIN_PROBE_INTERVAL:
        raise ProtocolError(f"{source}: health.start_interval must be at least "
                            f"{MIN_PROBE_INTERVAL * 1000:g}ms")
    if m.health.start_timeout <= 0 or m.hooks.timeout <= 0 or m.stop.timeout <= 0:
        # 0 would fail every start ("not healthy within 0s") or every hook, or kill at once.
        raise ProtocolError(f"{source}: health.start_timeout, hooks.timeout and stop.timeout "
                            "must be above 0")
    if m.health.restart_after < 0:
        raise ProtocolError(f"{source}: health.restart_after must be 0 (off) or a duration")
    for key, value in m.env.items():
        if not key or "=" in key or "\0" in key:
            raise ProtocolError(f"{source}: env key {key!r} is not a valid variable name")
        if "\0" in value:
            raise ProtocolError(f"{source}: env.{key} has a NUL character")
    for hook in ("pre_start", "validate"):
        argv = getattr(m.hooks, hook)
        if argv is not None and not argv:
            raise ProtocolError(f"{source}: hooks.{hook} must be a non-empty list of arguments")
