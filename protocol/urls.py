"""NATS server URLs as ``--nats`` takes them, checked before anything connects.

A URL nats-py cannot use never reaches a server: without this check a typo (``nats://h:abc``,
a port past 65535, ``http://``) waits out the connect deadline and then reads as "cannot reach
NATS". ``check_servers`` accepts what nats-py takes: ``nats://``, ``tls://``, ``ws://`` or
``wss://`` with a host and an optional port of 1-65535 (nats-py adds 4222), or ``HOST:PORT``
with no scheme (nats-py adds ``nats://``); several, comma-separated, for a cluster, all
websocket or none (nats-py refuses the mix). Pure: no IO, no name lookups.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from protocol.errors import ProtocolError

SCHEMES = ("nats", "tls", "ws", "wss")
_EXAMPLE = "e.g. nats://127.0.0.1:4222"
_SHOWN = 80  # characters of a bad value a message repeats
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?[^@/]*@")


def check_servers(text: str, *, flag: str = "--nats") -> list[str]:
    """The servers of ``text`` (one URL, or several separated by commas), stripped; raise
    ProtocolError naming ``flag`` and what is wrong with the first bad one."""
    servers = [part.strip() for part in text.split(",") if part.strip()]
    if not servers:
        raise ProtocolError(f"{flag} is empty; give a NATS server URL, {_EXAMPLE}")
    schemes = {check_server(server, flag=flag) for server in servers}
    if len(schemes & {"ws", "wss"}) and len(schemes - {"ws", "wss"}):
        raise ProtocolError(f"{flag} mixes websocket (ws://, wss://) and other URLs, which the "
                            "NATS client refuses; list servers of one kind")
    return servers


def check_server(url: str, *, flag: str = "--nats") -> str:
    """The scheme of one server ``url``; ProtocolError if nats-py could not connect to it."""
    shown = _USERINFO.sub(lambda m: f"{m['scheme'] or ''}***@", url, count=1)  # no password
    shown = shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."
    if "://" in url:
        scheme = url.partition("://")[0]
        if scheme not in SCHEMES:
            raise ProtocolError(f"{flag} {shown!r} is not a NATS URL: the scheme must be one of "
                                f"{', '.join(s + '://' for s in SCHEMES)}; {_EXAMPLE}")
    elif ":" in url:
        scheme, url = "nats", "nats://" + url
    else:
        raise ProtocolError(f"{flag} {shown!r} is not a NATS URL: it has no scheme and no port; "
                            f"write nats://HOST:PORT, {_EXAMPLE}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ProtocolError(f"{flag} {shown!r} is not a NATS URL ({exc}); {_EXAMPLE}") from None
    if not parts.hostname:
        raise ProtocolError(f"{flag} {shown!r} names no host; {_EXAMPLE}")
    if port == 0:
        raise ProtocolError(f"{flag} {shown!r}: port 0 is no server's port; use 1-65535, "
                            f"{_EXAMPLE}")
    return scheme
