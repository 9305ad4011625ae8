"""fleetwave's wire contract: messages, subjects, codecs, signing.

Everything that crosses a process boundary is defined here, as msgspec Structs encoded as JSON, so
that any NATS client in any language can speak to a fleet (``fleetwave protocol schema`` prints the
JSON Schema). This package holds data only: it imports neither ``agent`` nor ``coordinator``.
Two exceptions, both plumbing the packages share: ``bus`` (the one module that imports ``nats``)
and ``events`` (the one event publisher: a bounded queue and one retry policy over the bus);
``testing`` is the fakes and builders every package's tests share.

Compatibility: wire Structs never forbid unknown fields and every new field gets a default, because
agents of two versions meet during an upgrade. Config Structs (the bundle manifest, rollout files)
forbid unknown keys so that a typo is an error, not a silently ignored setting.
"""

from protocol.errors import ProtocolError

SCHEMA_VERSION = 1

__all__ = ["SCHEMA_VERSION", "ProtocolError"]
