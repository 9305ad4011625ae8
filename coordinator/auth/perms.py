"""What each identity may publish and subscribe to on the bus: pure functions of fleet and name.

Three roles, from least to most trusted:

- **node**: exactly what its agent uses (``agent/``, ``protocol/bus.py``): read its own desired
  keys (a watch whose consumer filters on its own keys), write its own observed
  and registration keys, publish its own heartbeats, registrations and agent events (on
  subjects naming it: ``subjects.agent_event``), read release objects, and receive replies on
  its own inbox prefix ``_INBOX_<node>`` only (the server answers its KV and JetStream requests
  there; nats-py's ``inbox_prefix``).
- **operator** (the ``fleetwave`` CLI): the coordinator's API on subjects that name it (so the
  coordinator knows who asks from the subject the server let through), reads of the fleet's state,
  release pushes; never a write to desired states, rollouts, locks, the lease, observed states or
  registrations (those go through the coordinator's API, or are a node's own), and never a
  purge or delete of a stream. Replies on ``_OPS_<name>`` (no node's prefix starts so: node ids
  never start with ``_``).
- **coordinator**: the fleet's subjects, buckets and the JetStream API; it answers API requests
  on the requester's inbox through ``allow_responses`` (so no one else needs to publish there),
  in up to ``protocol.chunks.MAX_CHUNKS`` messages each.

How KV maps to subjects (JetStream's own naming, which these permissions rely on):
  a KV put of key K in bucket B   = publish on  $KV.B.K                    (ack on a reply inbox)
  a KV get                        = request on  $JS.API.STREAM.MSG.GET.KV_B  (key in the body)
  a KV watch of keys F            = request on  $JS.API.CONSUMER.CREATE.KV_B.<name>.$KV.B.F
"""

from __future__ import annotations

from typing import Any

from protocol import chunks, subjects

Permissions = dict[str, Any]


def node_inbox(node: str) -> str:
    return f"_INBOX_{node}"


def operator_inbox(name: str) -> str:
    return f"_OPS_{name}"


def node(fleet: str, node_id: str) -> Permissions:
    """A node's agent: its own keys and subjects, read-only releases, its own inbox.

    Left out on purpose (the attack matrix, ``tests/integration/test_auth_matrix.py``, tries
    each): ``STREAM.INFO`` of the KV streams (its ``subjects_filter`` body lists every key: all
    node ids and services), ``CONSUMER.INFO`` (by name: another node's watch's filter, inbox and
    progress), both answered without the server for a node (``protocol.bus``: ``blind``); KV
    gets (the agent only watches; the fleet's buckets serve no direct gets, and
    ``STREAM.MSG.GET`` takes the key in its body where no permission can see it); consumers with
    the filter in the body (the bare ``CONSUMER.CREATE.<stream>``); ``CONSUMER.DELETE``
    (nats-py never deletes a watch's consumer: the server drops it after its inactive
    threshold); ``$JS.API.INFO`` (the account's streams, consumers and storage in use).
    """
    desired = subjects.desired_bucket(fleet)
    observed = subjects.observed_bucket(fleet)
    nodes = subjects.nodes_bucket(fleet)
    releases = subjects.object_stream(subjects.releases_store(fleet))
    mine = subjects.node_keys(node_id)
    return {
        "publish": {
            "allow": [
                subjects.heartbeat(fleet, node_id),
                subjects.register(fleet, node_id),
                subjects.agent_events(fleet, node_id),
                f"$KV.{observed}.{mine}",
                f"$KV.{nodes}.{node_id}",
                # Its watch (and snapshot) of its own keys: the server refuses a body whose
                # filter differs from the one in the subject. The consumer's name follows the
                # watcher's deliver inbox (``_INBOX_<node>.<nuid>``), which no other node sees
                # and none can list (no CONSUMER.NAMES or LIST here).
                f"$JS.API.CONSUMER.CREATE.KV_{desired}.*.$KV.{desired}.{mine}",
                f"$JS.FC.KV_{desired}.>",
                # Releases: every node may read every release (nothing secret to a node in the
                # names or bodies), so stream info, gets and consumers by body give nothing away.
                f"$JS.API.STREAM.INFO.{releases}",
                f"$JS.API.DIRECT.GET.{releases}.>",
                f"$JS.API.STREAM.MSG.GET.{releases}",
                f"$JS.API.CONSUMER.CREATE.{releases}",
                f"$JS.API.CONSUMER.CREATE.{releases}.>",
                f"$JS.FC.{releases}.>",
            ],
        },
        # Its inbox, and the leader's heartbeat pace (``subjects.pace``; only a coordinator
        # may publish it).
        "subscribe": {"allow": [f"{node_inbox(node_id)}.>", subjects.pace(fleet)]},
    }


def operator(fleet: str, name: str) -> Permissions:
    """An operator's CLI: the API, reads, release pushes; no direct writes of fleet state."""
    f = fleet
    return {
        "publish": {
            "allow": [
                # Its own name in every API subject: the coordinator records that name as
                # ``who`` (``protocol.subjects``), so no operator can ask as another.
                *subjects.operator_api(f, name),
                # The subjects of older CLIs, which name no caller: a coordinator with
                # credentials answers their writes "upgrade the CLI" (a refusal by the server
                # would leave that CLI waiting for a timeout, with no hint why).
                subjects.legacy_api(f, "*"), subjects.legacy_coordinator_api(f, "*", "*"),
                f"$O.{subjects.releases_store(f)}.>",
                f"$KV.{subjects.release_index_bucket(f)}.>",
                "$JS.API.>",
                "$JS.FC.>",
                "$JS.ACK.>",
            ],
            "deny": [
                *(f"$KV.{b}.>" for b in (
                    subjects.desired_bucket(f), subjects.rollouts_bucket(f),
                    subjects.locks_bucket(f), subjects.lease_bucket(f),
                    subjects.observed_bucket(f), subjects.nodes_bucket(f),
                    subjects.cordons_bucket(f))),
                "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>",
                "$JS.API.STREAM.MSG.DELETE.>", "$JS.API.STREAM.UPDATE.>",
                # A stream the operator made could republish (or source) what it captures onto
                # any subject, the server publishing it without the operator's permissions:
                # heartbeats, the coordinator's events in the audit log. The coordinator makes
                # every stream of the fleet (``Bus.ensure_fleet``); the CLI makes none.
                "$JS.API.STREAM.CREATE.>",
                # Nothing the CLI does: deleting or pausing a consumer (an agent's watch),
                # restoring over a stream or moving one, taking servers or leaders away.
                "$JS.API.CONSUMER.DELETE.>", "$JS.API.CONSUMER.PAUSE.>",
                "$JS.API.CONSUMER.UNPIN.>", "$JS.API.CONSUMER.LEADER.STEPDOWN.>",
                "$JS.API.STREAM.LEADER.STEPDOWN.>", "$JS.API.STREAM.PEER.REMOVE.>",
                "$JS.API.STREAM.SNAPSHOT.>", "$JS.API.STREAM.RESTORE.>",
                "$JS.API.ACCOUNT.PURGE.>", "$JS.API.ACCOUNT.STREAM.MOVE.>",
                "$JS.API.ACCOUNT.STREAM.CANCEL_MOVE.>", "$JS.API.META.LEADER.STEPDOWN",
                "$JS.API.SERVER.REMOVE",
            ],
        },
        "subscribe": {"allow": [f"{operator_inbox(name)}.>", subjects.events(f)]},
    }


def coordinator(fleet: str) -> Permissions:
    """The coordinators (every replica shares one identity): the fleet's whole namespace."""
    f = fleet
    buckets = (subjects.desired_bucket(f), subjects.observed_bucket(f),
               subjects.rollouts_bucket(f), subjects.nodes_bucket(f), subjects.locks_bucket(f),
               subjects.release_index_bucket(f), subjects.lease_bucket(f),
               subjects.cordons_bucket(f))
    return {
        "publish": {
            "allow": [
                f"fw.{f}.>", *(f"$KV.{b}.>" for b in buckets),
                f"$O.{subjects.releases_store(f)}.>",
                "$JS.API.>", "$JS.FC.>", "$JS.ACK.>", "$SRV.>", "_INBOX.>",
            ],
        },
        "subscribe": {"allow": [f"fw.{f}.>", "$SRV.>", "_INBOX.>"]},
        # An answer may take up to MAX_CHUNKS messages (``protocol.chunks``), each on the
        # requester's inbox, within a handler's time (``coordinator.api.verbs``, 30 s) and the
        # sending: the server counts both limits from when the request reached the responder.
        "allow_responses": {"max": chunks.MAX_CHUNKS, "expires": "2m"},
    }


def for_identity(fleet: str, role: str, name: str) -> Permissions:
    if role == "node":
        return node(fleet, name)
    if role == "operator":
        return operator(fleet, name)
    return coordinator(fleet)
