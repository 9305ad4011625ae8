"""What each identity may publish and subscribe to on the bus: pure functions of fleet and name.

Three roles, from least to most trusted:

- **node**: exactly what its agent uses (``agent/``, ``protocol/bus.py``): read its own desired
  keys (a watch whose consumer filters on its own keys), write its own observed
  and registration keys, publish its own heartbeats, registrations and agent events (on
  subjects naming it: ``subjects.agent_event``), read release objects, and receive replies on
  its own inbox prefix ``_FWN.<node>`` only (the server answers its KV and JetStream requests
  there, and its watches deliver there; nats-py's ``inbox_prefix``).
- **operator** (the ``fleetwave`` CLI): the coordinator's API on subjects that name it (so the
  coordinator knows who asks from the subject the server let through), reads of the fleet's state,
  release pushes; never a write to desired states, rollouts, locks, the lease, observed states or
  registrations (those go through the coordinator's API, or are a node's own), and never a
  purge or delete of a stream. Replies on ``_FWO.<name>``.
- **coordinator**: the fleet's subjects, buckets and the JetStream API; it answers API requests
  on the requester's reply subject (the server's ``_R_.`` mapping, an operator's inbox; so no
  one else needs to publish there), in up to ``protocol.chunks.MAX_CHUNKS`` messages each.

**Accounts** (``accounts``; the layout of every auth directory made since session 23, and of an
older one after ``fleetwave auth migrate``). nats-server checks no reply subject against the
requester's permissions, and publishes a request's answer (a JetStream API answer, a publish
acknowledgement, the coordinator's own) onto whatever reply subject the request named, with the
responder's rights; a KV bucket's stream stores whatever arrives on its subjects. In one account
any principal could so have the server write into any key of the fleet (a node's credentials
deposed the coordinator: the lease key). So the fleet lives in three accounts:

- ``FLEET``: the coordinators and JetStream (every stream of the fleet). It *exports* what the
  others may reach: as services, the subjects nodes and operators publish or ask on (each
  answer goes back through the server's ``_R_.`` reply mapping into the asker's own account,
  where no stream stores it); as streams, the deliveries of their consumers (``_FWN.>``,
  ``_FWO.>``), the pace, the word of releases pushed and the events.
- ``NODES``: every node; *imports* only what ``node`` allows (the permissions still confine each
  node to its own keys, subjects and inbox).
- ``OPS``: operators; imports the API, reads of the fleet's state, release pushes.

What the server does, checked on nats-server 2.15 (``tests/integration/test_auth_accounts.py``):
an answer to a request sent from NODES or OPS never reaches FLEET again through a wildcard
import (its subject there is the ``_R_.`` one), so no import here is a literal subject that
matters; JetStream's wildcard exports do not overlap (an import that two wildcard exports
match takes either's response type, by map order), and the pull ``MSG.NEXT`` one answers a
stream of messages, as does the releases' bare ``DIRECT.GET`` (batches): a literal export,
which an import of that very subject takes before the wildcard ``DIRECT.GET.>`` (the server
looks an export up by its subject first); an account without JetStream gets the server's own
``$JS.API.>`` import ("JetStream not enabled") unless one of its imports covers
``$JS.API.INFO``, which NODES imports and no node may publish; a message that came in
through a service import is never passed on to a stream export, so agents' events reach OPS
from NODES directly.

Older auth directories keep one account (``$G``, the server's global one) until migrated; their
nodes and operators may use both inbox prefixes (this release's and the one before), once
their ``users.conf`` is rendered by this release (``fleetwave auth prune``, a broker's start):
then clients of either release work, and every one must be of this release before the
migration.

How KV maps to subjects (JetStream's own naming, which these permissions rely on):
  a KV put of key K in bucket B   = publish on  $KV.B.K                    (ack on a reply inbox)
  a KV get                        = request on  $JS.API.STREAM.MSG.GET.KV_B  (key in the body)
  a KV watch of keys F            = request on  $JS.API.CONSUMER.CREATE.KV_B.<name>.$KV.B.F
"""

from __future__ import annotations

from typing import Any

from protocol import chunks, subjects

Permissions = dict[str, Any]


FLEET, NODES, OPS = "FLEET", "NODES", "OPS"
ACCOUNT_OF = {"coordinator": FLEET, "node": NODES, "operator": OPS}
NODE_INBOXES, OPERATOR_INBOXES = "_FWN", "_FWO"  # two tokens: one stream export serves all


def node_inbox(node: str) -> str:
    return f"{NODE_INBOXES}.{node}"


def operator_inbox(name: str) -> str:
    return f"{OPERATOR_INBOXES}.{name}"


def legacy_node_inbox(node: str) -> str:
    """A node's inbox prefix before session 23 (one account only)."""
    return f"_INBOX_{node}"


def legacy_operator_inbox(name: str) -> str:
    return f"_OPS_{name}"


def node(fleet: str, node_id: str, *, accounts: bool = True) -> Permissions:
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
                # watcher's deliver inbox (``_FWN.<node>.<nuid>``), which no other node sees
                # and none can list (no CONSUMER.NAMES or LIST here).
                f"$JS.API.CONSUMER.CREATE.KV_{desired}.*.$KV.{desired}.{mine}",
                f"$JS.FC.KV_{desired}.>",
                # Releases: every node may read every release (nothing secret to a node in the
                # names or bodies), so stream info, gets and consumers by body give nothing away.
                # A release of several chunks comes in batches of direct gets (the bare
                # subject, the request in the body: ``protocol.direct``).
                f"$JS.API.STREAM.INFO.{releases}",
                f"$JS.API.DIRECT.GET.{releases}",
                f"$JS.API.DIRECT.GET.{releases}.>",
                f"$JS.API.STREAM.MSG.GET.{releases}",
                f"$JS.API.CONSUMER.CREATE.{releases}",
                f"$JS.API.CONSUMER.CREATE.{releases}.>",
                f"$JS.FC.{releases}.>",
            ],
        },
        # Its inbox, the leader's heartbeat pace (``subjects.pace``) and its word of the
        # releases pushed (``subjects.released``); only a coordinator may publish those two.
        "subscribe": {"allow": [f"{node_inbox(node_id)}.>", subjects.pace(fleet),
                                subjects.released(fleet),
                                *([] if accounts else [f"{legacy_node_inbox(node_id)}.>"])]},
    }


def operator(fleet: str, name: str, *, accounts: bool = True) -> Permissions:
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
                # ...and their kin in nats-server 2.16 (a review found them reachable: the
                # allow above is the whole API less this list, so a server's new verbs need
                # adding here): moving replicas off a server, undoing a move, resetting a
                # consumer (an agent's watch), evacuating a server, rescuing the meta group.
                "$JS.API.STREAM.PEER.EVACUATE.>", "$JS.API.STREAM.CANCEL_MOVE.>",
                "$JS.API.CONSUMER.PEER.EVACUATE.>", "$JS.API.CONSUMER.PEER.REMOVE.>",
                "$JS.API.CONSUMER.RESET.>", "$JS.API.SERVER.EVACUATE", "$JS.API.META.RESCUE",
                # The names of others' consumers: a create that names an existing consumer
                # updates it, so an operator who could list the names re-pointed the
                # coordinator's watch of the observed states at no key (a review: every
                # rollout failed, and no API call said who). A watch's name follows its random
                # inbox; the CLI lists none (the leader's sweep does, as the coordinator), and
                # makes no durable consumer.
                "$JS.API.CONSUMER.LIST.>", "$JS.API.CONSUMER.NAMES.>",
                "$JS.API.CONSUMER.DURABLE.>",
            ],
        },
        "subscribe": {"allow": [f"{operator_inbox(name)}.>", subjects.events(f),
                                *([] if accounts else [f"{legacy_operator_inbox(name)}.>"])]},
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
                # Answers to operators: through the server's reply mapping (accounts), or on
                # their inboxes (one account). Allowed outright, not only by allow_responses
                # below: every reload of the users (an identity added, renewed, revoked)
                # forgets the answers a client was allowed to send, and an answer under way then
                # was refused ("Publish Violation"), its operator waiting for nothing.
                "_R_.>", f"{OPERATOR_INBOXES}.>",
            ],
        },
        # The releases store's object infos too: the leader tells the agents of each release
        # pushed (``coordinator.runtime.released``).
        # ...and JetStream's audit of its API calls: the leader deletes a consumer made to
        # deliver onto the fleet's subjects as soon as it is made (``runtime.deliveries``).
        "subscribe": {"allow": [f"fw.{f}.>", "$SRV.>", "_INBOX.>",
                                subjects.object_meta(subjects.releases_store(f)),
                                "$JS.EVENT.ADVISORY.API"]},
        # What the allow list above does not cover (an operator inbox of the one-account
        # layout before session 23, ``legacy_operator_inbox``): an answer may take up to
        # MAX_CHUNKS messages (``protocol.chunks``), within a handler's time
        # (``coordinator.api.verbs``, 30 s) and the sending: the server counts both limits from
        # when the request reached the responder, and forgets them at a reload.
        "allow_responses": {"max": chunks.MAX_CHUNKS, "expires": "2m"},
    }


def for_identity(fleet: str, role: str, name: str, *, accounts: bool = True) -> Permissions:
    if role == "node":
        return node(fleet, name, accounts=accounts)
    if role == "operator":
        return operator(fleet, name, accounts=accounts)
    return coordinator(fleet)


# What operators ask of JetStream, as imports that do not overlap one another (nor FLEET's
# exports: each is exported as it is). Their permissions narrow it (no purge, delete, ...).
OPS_JETSTREAM = ("$JS.API.INFO", "$JS.API.STREAM.>", "$JS.API.DIRECT.GET.>",
                 "$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.>",
                 "$JS.API.CONSUMER.INFO.>", "$JS.API.CONSUMER.NAMES.>",
                 "$JS.API.CONSUMER.LIST.>")
PULL = "$JS.API.CONSUMER.MSG.NEXT.>"  # a pull request is answered by a stream of messages


def accounts(fleet: str) -> dict[str, dict[str, list[Any]]]:
    """Each account's exports and imports (users apart): see the module docstring."""
    f = fleet
    releases = subjects.object_stream(subjects.releases_store(f))
    desired = subjects.kv_stream(subjects.desired_bucket(f))
    many = {"response_type": "stream", "response_threshold": "2m"}  # protocol.chunks
    node_writes = (f"$KV.{subjects.observed_bucket(f)}.>", f"$KV.{subjects.nodes_bucket(f)}.>",
                   subjects.heartbeats(f), subjects.registrations(f),
                   subjects.agent_events(f, "*", ">"))
    pushes = (f"$KV.{subjects.release_index_bucket(f)}.>", f"$O.{subjects.releases_store(f)}.>")
    api = (f"fw.{f}.api.>", f"fw.{f}.coord.>")
    # A batch of direct gets is answered by many messages: exported on its own as a stream of
    # answers (an import takes an export that matches it exactly before a wildcard one).
    batches = f"$JS.API.DIRECT.GET.{releases}"
    node_reads = (f"$JS.API.CONSUMER.CREATE.{desired}.>", f"$JS.API.STREAM.INFO.{releases}",
                  batches,
                  f"$JS.API.DIRECT.GET.{releases}.>", f"$JS.API.STREAM.MSG.GET.{releases}",
                  f"$JS.API.CONSUMER.CREATE.{releases}", f"$JS.API.CONSUMER.CREATE.{releases}.>",
                  f"$JS.FC.{desired}.>", f"$JS.FC.{releases}.>",
                  "$JS.API.INFO")  # no node may publish it: it turns the server's own import off
    to_nodes = (f"{NODE_INBOXES}.>", subjects.pace(f), subjects.released(f))
    to_ops = (f"{OPERATOR_INBOXES}.>", subjects.events(f))

    def service(account: str, subject: str) -> dict[str, Any]:
        return {"service": {"account": account, "subject": subject}}

    def stream(account: str, subject: str) -> dict[str, Any]:
        return {"stream": {"account": account, "subject": subject}}

    return {
        FLEET: {"exports": [
            *({"service": s} for s in (*node_writes, *pushes, *OPS_JETSTREAM, "$JS.FC.>",
                                       "$JS.ACK.>")),
            *({"service": s, **many} for s in (*api, PULL, batches)),
            *({"stream": s} for s in (*to_nodes, *to_ops)),
        ], "imports": []},
        NODES: {
            "imports": [*(service(FLEET, s) for s in (*node_writes, *node_reads)),
                        *(stream(FLEET, s) for s in to_nodes)],
            "exports": [{"stream": subjects.agent_events(f, "*", ">"), "accounts": [OPS]}],
        },
        OPS: {
            "imports": [*(service(FLEET, s) for s in (*api, *pushes, *OPS_JETSTREAM, PULL,
                                                       "$JS.FC.>", "$JS.ACK.>")),
                        *(stream(FLEET, s) for s in to_ops),
                        stream(NODES, subjects.agent_events(f, "*", ">"))],
            "exports": [],
        },
    }
