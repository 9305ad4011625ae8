"""JSON Schema of the wire messages, for integrations written in other languages."""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import messages
from protocol.notify import Notification

WIRE_TYPES: tuple[type[msgspec.Struct], ...] = (
    messages.NodeInfo,
    messages.Heartbeat,
    messages.DesiredState,
    messages.SignedEnvelope,
    messages.ObservedState,
    messages.RolloutSpec,
    messages.RolloutRecord,
    messages.Event,
    messages.ApiReply,
    messages.NodeView,
    messages.NodesRequest,
    messages.DeployRequest,
    messages.RolloutRequest,
    messages.RollbackRequest,
    messages.ListRolloutsRequest,
    messages.CordonRequest,
    messages.Cordon,
    Notification,
)


def wire_schema() -> dict[str, Any]:
    """One JSON Schema document: ``$defs`` holds every message, ``messages`` lists the top ones."""
    refs, components = msgspec.json.schema_components(WIRE_TYPES)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fleetwave wire protocol",
        "description": "JSON messages exchanged over NATS by fleetwave agents and coordinators.",
        "messages": {tp.__name__: ref for tp, ref in zip(WIRE_TYPES, refs, strict=True)},
        "$defs": components,
    }
