"""The coordinator's config file: ``fleetwave coordinator --config FILE`` (env FLEETWAVE_CONFIG).

A TOML file for what is awkward on a command line: notification targets each with its own
secret (a flag shows in ``ps``; a file can be 0600), and the HTTP address::

    http = "127.0.0.1:9090"            # as --http

    [[notify]]                         # as --notify, once per table
    url = "https://hooks.example.com/fleetwave"
    secret = "..."                     # signs this target's notifications (else --notify-secret)

    [[notify]]
    url = "slack+https://hooks.slack.com/services/T000/B000/XXXX"

Flags (and their environment variables) override the file: ``--http`` replaces ``http``, and
any ``--notify`` replaces every ``[[notify]]`` table (one list of targets, never two merged).
``--notify-secret`` signs the targets that have no ``secret`` of their own.
Unknown keys are an error that names the key, as in the bundle manifest: a typo'd key must not
silently leave notifications unsigned.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import msgspec

from coordinator.dev.cluster import parse_hostport
from coordinator.errors import ConfigError, UsageError
from coordinator.runtime.notify_doc import BadTarget, Target, parse_target


class NotifyTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    secret: str | None = None


class FileConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    http: str | None = None
    notify: list[NotifyTable] = []


class CoordinatorConfig(msgspec.Struct, kw_only=True, frozen=True):
    """What the file says, checked: the HTTP address and the notification targets."""

    http: tuple[str, int] | None = None
    notify: tuple[Target, ...] = ()

    def under(self, notify: list[Target], http: tuple[str, int] | None
              ) -> tuple[list[Target], tuple[str, int] | None]:
        """The flags' ``notify`` and ``http`` where given (not empty, not None), else the
        file's: flags override the file, a list of targets as a whole."""
        return (notify or list(self.notify)), (http or self.http)


def parse(text: str, where: str) -> CoordinatorConfig:
    """The config in TOML ``text`` (read from ``where``, named in errors); ConfigError (exit 2)
    saying what is wrong and where."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc}); fix the file") from None
    try:
        data = msgspec.convert(raw, FileConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_say(str(exc))}; the keys are http and [[notify]] tables "
                          "with url and secret") from None
    http = None
    if data.http is not None:
        try:
            http = parse_hostport(data.http, what="http")
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    targets = []
    for i, table in enumerate(data.notify):
        try:
            target = parse_target(table.url)
        except BadTarget as exc:
            raise ConfigError(f"{where}: [[notify]] #{i + 1}: {exc}") from None
        if table.secret is not None:
            if not table.secret:
                raise ConfigError(f"{where}: [[notify]] #{i + 1}: secret is empty; give one or "
                                  "leave the key out")
            target = replace(target, secret=table.secret.encode())
        targets.append(target)
    return CoordinatorConfig(http=http, notify=tuple(targets))


def load(path: Path) -> CoordinatorConfig:
    """``parse`` of the file at ``path``; ConfigError if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--config {path}: cannot read it ({why}); give a readable TOML "
                          "file") from None
    return parse(text, f"--config {path}")


def _say(message: str) -> str:
    """msgspec's ``Object contains unknown field `x` - at `$.notify[0]``` in our words."""
    text, _, at = message.partition(" - at ")
    text = text.replace("Object contains unknown field", "unknown key")
    at = at.strip("`").removeprefix("$").lstrip(".")
    if m := re.fullmatch(r"notify\[(\d+)\](?:\.(\w+))?", at):
        at = f"[[notify]] #{int(m[1]) + 1}" + (f" key {m[2]}" if m[2] else "")
    return f"{text} in {at}" if at else text
