"""Every NATS subject, KV bucket, stream and object store name fleetwave uses, in one place.

Names are functions of the fleet so that several fleets share one NATS system without meeting.
KV keys are ``<node>.<service>``; node ids and service names are therefore restricted to
``[A-Za-z0-9_-]`` (checked by ``check_name``) so that a key can never be split differently, and
may not start with ``_``, which marks keys of fleetwave's own (``FENCE_KEY``).
"""

import re

from protocol.errors import ProtocolError

_NAME = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]{0,63}\Z")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a usable fleet, node or service name, else raise ProtocolError."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ProtocolError(
            f"{kind} name {value!r} is not allowed: use 1-64 letters, digits, '-' or '_', "
            "not starting with '_'"
        )
    return value


# -- core NATS subjects ---------------------------------------------------------------------------

def heartbeat(fleet: str, node: str) -> str:
    return f"fw.{fleet}.hb.{node}"


def heartbeats(fleet: str) -> str:
    return f"fw.{fleet}.hb.*"


def register(fleet: str, node: str) -> str:
    """An agent announces its NodeInfo here on connect and on every reconnect.

    One subject per node, like heartbeats, so that a server's permissions bind a registration to
    the credentials that sent it: a node's user may publish only on its own.
    """
    return f"fw.{fleet}.register.{node}"


def registrations(fleet: str) -> str:
    return f"fw.{fleet}.register.*"


def pace(fleet: str) -> str:
    """The leader tells every agent how often it may beat at most (``messages.Pace``): a fleet
    of 50,000 beating every 2 s would be 25,000 messages a second into one coordinator."""
    return f"fw.{fleet}.pace"


def released(fleet: str) -> str:
    """The leader tells every agent of each release pushed to the fleet's store
    (``messages.ReleaseNotice``), so that the nodes running that service fetch it before a deploy
    needs it (``agent.manager.prefetch``). Only a coordinator may publish it."""
    return f"fw.{fleet}.released"


# -- the coordinator's API ------------------------------------------------------------------------
#
# Every API request names its caller in its subject, ``fw.<fleet>.api.<caller>.<verb>`` (and
# ``fw.<fleet>.coord.<id>.api.<caller>.<verb>`` for one coordinator), because NATS does not tell a
# responder who published a request: on a secure fleet the server lets operator ``alice`` publish
# only on subjects naming ``alice`` (``coordinator.auth.perms.operator``), so the token is what her
# credentials prove, and the coordinator records it as ``who`` on every event the request causes.
# On an open bus nothing proves it: the CLI names its OS user, a claim. A caller is a name as
# ``check_name`` allows; two are the coordinator's own (``RESERVED_CALLERS``): "coordinator" for
# the decisions it takes by itself, "unknown" for a request on the subjects of CLIs older than
# this scheme (``legacy_api``), which name no caller.

COORDINATOR_CALLER = "coordinator"
UNKNOWN_CALLER = "unknown"
RESERVED_CALLERS = (COORDINATOR_CALLER, UNKNOWN_CALLER)

# The verbs that change a rollout: only the leading coordinator carries them out.
WRITE_VERBS = ("deploy", "pause", "resume", "promote", "abort", "rollback", "cordon", "uncordon",
               "forget")


def api(fleet: str, caller: str, verb: str) -> str:
    """The subject on which ``caller`` asks any coordinator for ``verb``."""
    return f"fw.{fleet}.api.{caller}.{verb}"


def api_endpoint(fleet: str, verb: str) -> str:
    """What the coordinators serve ``verb`` on: the requests of every caller."""
    return api(fleet, "*", verb)


def coordinator_api(fleet: str, coordinator: str, caller: str, verb: str) -> str:
    """The subject on which one coordinator alone answers ``caller``'s ``verb`` (the leader's
    writes, sent there by the CLI or forwarded there by a standby with the caller kept)."""
    return f"fw.{fleet}.coord.{coordinator}.api.{caller}.{verb}"


def coordinator_endpoint(fleet: str, coordinator: str, verb: str) -> str:
    return coordinator_api(fleet, coordinator, "*", verb)


def operator_api(fleet: str, caller: str) -> tuple[str, str]:
    """The request subjects of one caller, of every verb (what its permissions allow)."""
    return api(fleet, caller, "*"), coordinator_api(fleet, "*", caller, "*")


def legacy_api(fleet: str, verb: str) -> str:
    """The subject of a CLI older than callers in subjects (answered for caller "unknown")."""
    return f"fw.{fleet}.api.{verb}"


def legacy_coordinator_api(fleet: str, coordinator: str, verb: str) -> str:
    return f"fw.{fleet}.coord.{coordinator}.api.{verb}"


def api_caller(subject: str) -> str:
    """The caller an API request's subject names: its token in ``api`` or ``coordinator_api``,
    UNKNOWN_CALLER on a legacy subject; ProtocolError if it is neither form.

    Fleet and caller tokens hold no dots (``check_name``), so the positions decide, not the
    words: a fleet or an operator may be called "api".
    """
    t = subject.split(".")
    if len(t) == 5 and t[0] == "fw" and t[2] == "api":
        return check_name("caller", t[3])
    if len(t) == 7 and t[0] == "fw" and t[2] == "coord" and t[4] == "api":
        return check_name("caller", t[5])
    if (len(t) == 4 and t[2] == "api") or (len(t) == 6 and t[2] == "coord" and t[4] == "api"):
        return UNKNOWN_CALLER
    raise ProtocolError(f"{subject!r} is not an API subject")


_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def caller_token(name: str) -> str:
    """A caller token for a name nothing vouches for (an OS user on an open bus): every run of
    characters a subject token may not hold becomes '-', at most 64 of them, never starting with
    '_' and never one of the coordinator's own names ("os-" is put before those)."""
    token = _NOT_IN_NAME.sub("-", name).lstrip("_")[:64] or "anonymous"
    return f"os-{token}"[:64] if token in RESERVED_CALLERS else token


def coordinator_ping(fleet: str, coordinator: str) -> str:
    """One coordinator's own subject: "no responders" there means its connection is gone."""
    return f"fw.{fleet}.coord.{coordinator}.ping"


def event(fleet: str, kind: str) -> str:
    """A coordinator's event of ``kind`` (its kinds never start with ``agent.``)."""
    return f"fw.{fleet}.evt.{kind}"


def agent_event(fleet: str, node: str, kind: str) -> str:
    """An event of ``kind`` that ``node``'s agent reports, on a subject naming that node.

    A node's credentials may publish only under its own ``agent.<node>.>`` (``coordinator.auth
    .perms``), so the subject, not the event's ``node`` field, says who sent it: readers take
    the node from here (``agent_event_node``) and refuse an event that names another.
    """
    return f"fw.{fleet}.evt.agent.{node}.{kind}"


def agent_events(fleet: str, node: str = "*", kind: str = ">") -> str:
    """Filter for the events of one node's agent (or every agent's), of one kind or all."""
    return f"fw.{fleet}.evt.agent.{node}.{kind}"


def agent_event_node(fleet: str, subject: str) -> str | None:
    """The node whose agent published on ``subject``; None for a coordinator's event."""
    prefix = f"fw.{fleet}.evt.agent."
    if not subject.startswith(prefix):
        return None
    return subject[len(prefix):].split(".", 1)[0]


def events(fleet: str) -> str:
    return f"fw.{fleet}.evt.>"


def is_event(fleet: str, subject: str) -> bool:
    """Whether ``subject`` is one of the fleet's events subjects (``events``)."""
    prefix = f"fw.{fleet}.evt."
    return subject.startswith(prefix) and len(subject) > len(prefix)


def rollout_events(fleet: str) -> str:
    return f"fw.{fleet}.evt.rollout.>"


# -- JetStream -------------------------------------------------------------------------------------

def desired_bucket(fleet: str) -> str:
    return f"fw-{fleet}-desired"


def observed_bucket(fleet: str) -> str:
    return f"fw-{fleet}-observed"


def rollouts_bucket(fleet: str) -> str:
    return f"fw-{fleet}-rollouts"


def nodes_bucket(fleet: str) -> str:
    """Last NodeInfo of every node that ever registered (survives coordinator restarts)."""
    return f"fw-{fleet}-nodes"


def locks_bucket(fleet: str) -> str:
    return f"fw-{fleet}-locks"


def cordons_bucket(fleet: str) -> str:
    """Operators' holds on nodes (``fleetwave cordon|drain``), key = node id; only the leading
    coordinator writes it (nodes may not: NodeInfo is theirs, this is the operator's)."""
    return f"fw-{fleet}-cordons"


def lease_bucket(fleet: str) -> str:
    """The coordinators' leader lease (key ``LEASE_KEY``): who leads, in which term."""
    return f"fw-{fleet}-lease"


LEASE_KEY = "leader"
# The fence marker every leader writes into each bucket it writes (``coordinator.runtime.lease``).
FENCE_KEY = "_fence"
# The rollouts bucket's history keys (``protocol.history``): per service, and the fleet's latest.
LATEST_KEY = "_latest"
INDEX_PREFIX = "_index."


def index_key(service: str) -> str:
    """The key of ``service``'s rollout index in the rollouts bucket."""
    return f"{INDEX_PREFIX}{service}"


def fenced_buckets(fleet: str) -> tuple[str, ...]:
    """The buckets only the leading coordinator writes, each fenced by its own FENCE_KEY."""
    return (rollouts_bucket(fleet), desired_bucket(fleet), locks_bucket(fleet),
            cordons_bucket(fleet))


def node_written_buckets(fleet: str) -> tuple[str, ...]:
    """The buckets agents write (each its own keys): their streams refuse rollup headers."""
    return (observed_bucket(fleet), nodes_bucket(fleet))


def releases_store(fleet: str) -> str:
    return f"fw-{fleet}-releases"


def release_index_bucket(fleet: str) -> str:
    """One record per pushed release (digest, size, manifest summary, time): what 'list' reads."""
    return f"fw-{fleet}-release-index"


def events_stream(fleet: str) -> str:
    return f"FW_{fleet}_EVENTS"


def kv_stream(bucket: str) -> str:
    """The stream that holds KV ``bucket`` (JetStream's own naming)."""
    return f"KV_{bucket}"


def object_stream(store: str) -> str:
    """The stream that holds object store ``store`` (JetStream's own naming)."""
    return f"OBJ_{store}"


def object_meta(store: str) -> str:
    """Every object's info in object store ``store`` (JetStream's own naming): published once
    an object's upload has finished, after its last chunk."""
    return f"$O.{store}.M.>"


def replicas_probe_stream(fleet: str, replicas: int) -> str:
    """A throwaway stream asking the servers whether ``replicas`` copies can be placed
    (``protocol.bus.Bus.check_replicas``); deleted at once."""
    return f"FW_{fleet}_PROBE_R{replicas}"


def replicas_probe(fleet: str, replicas: int) -> str:
    return f"fw.{fleet}.probe.r{replicas}"


def node_service_key(node: str, service: str) -> str:
    return f"{node}.{service}"


def node_keys(node: str) -> str:
    """KV key filter for every service of one node (an agent watches only this)."""
    return f"{node}.*"


def release_key(service: str, version: str) -> str:
    return f"{service}/{version}"


def release_record_key(service: str, version: str) -> str:
    """KV key of a release record: ``<service>.<version>`` with the version escaped.

    KV keys allow neither ``+`` nor empty tokens (a version such as ``1..0``), so every byte of the
    version outside ``[A-Za-z0-9_-]`` is written ``=XX`` (hex); ``<service>.>`` lists one service.
    """
    escaped = "".join(
        chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-") else f"={b:02X}"
        for b in version.encode()
    )
    return f"{service}.{escaped}"


def release_records(service: str | None = None) -> str:
    """KV key filter for the release records of one service, or of all."""
    return f"{service}.>" if service else ">"
