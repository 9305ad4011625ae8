"""The leader's word to the agents of every release pushed: ``relay`` and ``notice_of``.

Theory of operation. A push (``coordinator.releases``) ends with the object's info published on
the releases store's meta subject (``subjects.object_meta``: JetStream's object store writes the
info after the last chunk, so the object is whole by then). The leading coordinator listens to
those subjects (core NATS: no consumer, nothing stored twice) and says each finished upload of a
release to every agent in one ``ReleaseNotice`` on ``subjects.released``; an agent that runs that
service fetches it before a deploy needs it (``agent.manager.prefetch``). The notice goes through
the coordinator, not straight from the store's subjects to the nodes, so that a node's account
imports one more subject of the leader's (as the pace) and nothing of the store's, and only a
coordinator can say it.

What is not a release is ignored (one debug line): a deleted object, a name that is not
``<service>/<version>``, an info that does not parse or whose digest is not SHA-256. A notice
that cannot be published is logged and dropped: it only saves the agents a fetch later (a deploy
fetches what is not at hand).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

import msgspec

from protocol import subjects
from protocol.bus import Bus
from protocol.codec import encode
from protocol.errors import BusError, ProtocolError
from protocol.messages import ReleaseNotice, ReleaseRef

log = logging.getLogger("fleetwave.coordinator.released")

_SHA256 = "SHA-256="


class _ObjectInfo(msgspec.Struct):
    """What of an object store info message a notice needs (the rest is the store's)."""

    name: str
    size: int = 0
    digest: str = ""
    deleted: bool = False


def notice_of(data: bytes) -> ReleaseNotice | None:
    """The notice an object info message of the releases store makes, or None (with the reason
    at debug) when it is not a finished release."""
    try:
        info = msgspec.json.decode(data, type=_ObjectInfo)
    except msgspec.DecodeError as exc:
        log.debug("ignored an object info that does not parse: %s", exc)
        return None
    service, _, version = info.name.partition("/")
    if info.deleted:
        return None
    try:
        subjects.check_name("service", service)
    except ProtocolError:
        log.debug("ignored object %r: not <service>/<version>", info.name)
        return None
    if not version or not info.digest.startswith(_SHA256):
        log.debug("ignored object %r: no version or no SHA-256 digest", info.name)
        return None
    raw = info.digest.removeprefix(_SHA256)
    try:
        sha = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        sha = b""
    if len(sha) != 32:
        log.debug("ignored object %r: its digest %r is not a SHA-256", info.name, info.digest)
        return None
    return ReleaseNotice(release=ReleaseRef(service=service, version=version,
                                            digest="sha256:" + sha.hex(), size=max(info.size, 0)))


async def relay(bus: Bus) -> None:
    """Say every release pushed to the fleet's store on ``subjects.released``, until cancelled
    (the leader runs it for as long as it leads)."""
    told = subjects.released(bus.fleet)
    warned = False

    async def on_info(subject: str, data: bytes) -> None:
        nonlocal warned
        notice = notice_of(data)
        if notice is None:
            return
        try:
            await bus.publish(told, encode(notice))
        except BusError as exc:
            if not warned:
                log.warning("cannot tell the agents of %s %s (they fetch it when deployed): %s",
                            notice.release.service, notice.release.version, exc)
            warned = True
        else:
            warned = False
            log.debug("told the agents of %s %s", notice.release.service,
                      notice.release.version)

    try:
        sub = await bus.subscribe(subjects.object_meta(subjects.releases_store(bus.fleet)),
                                  on_info)
    except BusError as exc:  # the connection closed for good: the process ends anyway
        log.warning("cannot tell the agents of the releases pushed (they fetch each when it is "
                    "deployed): %s", exc)
        await asyncio.Event().wait()  # leading goes on without it: it ends with the leadership
    try:
        await asyncio.Event().wait()
    finally:
        await bus.unsubscribe(sub)
