"""Wire messages: what agents, the coordinator and integrations say to each other.

Vocabulary (see DESIGN.md): a *node* runs one agent; each *service* on a node has two *slots*,
``a`` and ``b``, each running one *release*; the node's *router* splits the service's traffic
between the slots by *weight* and may *mirror* a share to a shadow slot. The coordinator writes a
*desired state* per (node, service) with a *generation* that only grows; the agent answers with an
*observed state* whose ``observed_generation`` says which desired state it has converged on.

Rules: every Struct here is a wire Struct, so none forbids unknown fields and every field added
later gets a default. Times are Unix seconds (float). Percentages are 0-100 numbers; rates are
fractions 0-1.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from protocol.report import RolloutReport

SLOTS: tuple[str, str] = ("a", "b")
Slot = Literal["a", "b"]

# Router latency histogram: upper bounds in milliseconds of each bucket; a last implicit bucket
# holds everything slower. Log-spaced (about x1.25) so that p99 is known to within ~12%.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(
    round(0.25 * 1.25**i, 3) for i in range(0, 52)
)  # 0.25 ms ... ~26 s


# What an agent that verifies batch-signed desired states (``protocol.signing.sign_batch``)
# says in ``NodeInfo.features``. Here, not in ``protocol.signing``: the agent's lean start
# (``agent.main``) must not import hashlib or the crypto to register.
FEATURE_BATCH = "batch-signatures"


class NodeInfo(msgspec.Struct, kw_only=True):
    """What an agent says about its host when it registers."""

    id: str
    labels: dict[str, str] = {}
    agent_version: str = ""
    hostname: str = ""
    platform: str = ""
    python: str = ""
    cpu_count: int = 0
    mem_total: int = 0
    bind_host: str = ""
    boot_time: float = 0.0
    started_at: float = 0.0
    simulated: bool = False
    # The coordinator public keys this agent accepts desired states from (public facts), so that
    # a signing-key rotation can check that every node trusts the new key before switching to
    # it; None: an agent too old to say.
    trust_keys: list[str] | None = None
    # What this agent can do that an older one cannot (``FEATURE_BATCH``): the
    # coordinator sends a node only what it says it takes.
    features: list[str] = []


# What a peer (an agent, a router) states as an integer, bounded where it is decoded. A node's
# credentials let it write any value into its own reports, and the coordinator computes with
# them: a review's node reported generation 10**4300 (an f-string then raised ValueError past
# Python's 4,300 digits) and router counters of 10**400 (OverflowError to float): each crashed
# the leader's runner, then every resync of that rollout, one leadership a second. A report
# outside these bounds is malformed: refused at decode, like any other.
Generation = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]  # a float holds it exactly
Weight = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Pid = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class SlotProcess(msgspec.Struct, kw_only=True):
    """psutil figures of one slot's process, carried in heartbeats."""

    service: str
    slot: str
    version: str = ""
    pid: Pid | None = None
    rss: Count = 0
    cpu_percent: float = 0.0
    restarts: Count = 0


DrainPhase = Literal["", "draining", "drained"]


class ServiceSummary(msgspec.Struct, kw_only=True):
    """One line per service in a heartbeat: what the node serves now."""

    service: str
    version: str = ""
    healthy: bool = False
    generation: Generation = 0
    observed_generation: Generation = 0
    # Out of service for maintenance (``fleetwave drain``): "draining" while the router still
    # accepts (the grace) or holds connections, "drained" once it does neither; "" otherwise.
    drain: DrainPhase = ""


class Heartbeat(msgspec.Struct, kw_only=True):
    """Published on core NATS every 2 s by every node; missing 3 in a row makes a node offline."""

    schema: int = 1
    node: str
    seq: Count = 0
    time: float = 0.0
    interval: float = 2.0
    labels: dict[str, str] = {}
    cpu_percent: float = 0.0
    mem_percent: float = 0.0
    disk_percent: float = 0.0
    load1: float = 0.0
    agent_rss: Count = 0
    agent_cpu_percent: float = 0.0
    services: list[ServiceSummary] = []
    slots: list[SlotProcess] = []


class Pace(msgspec.Struct, kw_only=True, frozen=True):
    """The leader's word to every agent on ``subjects.pace``: beat no more often than every
    ``interval`` seconds, so that ``nodes`` beat at most ``rate`` times a second in all (Nomad's
    ``max_heartbeats_per_second``). An agent beats at the longer of this and its own
    ``--heartbeat-interval``, and announces it in its Heartbeat, which is what the coordinator
    judges its silence by."""

    schema: int = 1
    interval: float
    nodes: int = 0
    rate: float = 0.0
    # The services whose running rollouts read the routers' counters (a bake, sequential
    # analysis): their agents report every read of their routers, however large the fleet.
    # None: not known yet (a leader still resuming its rollouts; an older leader): an agent
    # keeps the services it was last told.
    reading: list[str] | None = None
    # Many agents are registering at once (a fleet-wide restart: an upgrade of every agent, a
    # site back from a power cut): an agent that waits for this pace before its first watch of
    # desired states starts it within the fleet's restart spread, not with all the others
    # (``coordinator.core.reconnects``, ``agent.manager.desired``). False from older leaders.
    burst: bool = False


# -- desired state ---------------------------------------------------------------------------------


class ReleaseRef(msgspec.Struct, kw_only=True, frozen=True):
    """A release as the coordinator names it: the object store key and the sha256 of the bundle."""

    service: str
    version: str
    digest: str  # "sha256:<hex>"
    size: int = 0


class ReleaseNotice(msgspec.Struct, kw_only=True, frozen=True):
    """The leader's word to every agent on ``subjects.released``: ``release`` is in the fleet's
    store now (its upload finished). A hint, not an instruction: an agent running that service
    fetches it ahead of a deploy (``agent.manager.prefetch``), checking the bytes against
    ``release.digest`` as any fetch does; nothing runs it until a signed desired state names
    that digest."""

    schema: int = 1
    release: ReleaseRef


class MirrorSpec(msgspec.Struct, kw_only=True, frozen=True):
    """Mirror ``percent`` of the requests with ``methods`` to ``slot`` and compare the answers."""

    slot: str
    percent: float
    methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "HEAD"])
    ignore_headers: list[str] = []
    ignore_json_fields: list[str] = []
    # Credential headers (Cookie, Authorization) the shadow gets all the same; by default the
    # copies go without them.
    keep_headers: list[str] = []


class DrainSpec(msgspec.Struct, kw_only=True):
    """A node taken out of service for maintenance (``fleetwave drain``): the service's router
    answers 503 on its readiness path at once, keeps serving for ``grace`` seconds (time for an
    external load balancer to notice), then stops accepting and drains its connections."""

    grace: float = 15.0
    since: float = 0.0  # when the operator drained the node (coordinator's clock)
    by: str = ""  # who drained it


class CohortSpec(msgspec.Struct, kw_only=True, frozen=True):
    """A canary's weight as a share of *users* (issue 15; the rule is ``protocol.cohort``).

    ``key`` is ``header:NAME``, ``cookie:NAME`` or ``ip``; ``salt`` the rollout id (one user, one
    bucket on every node and every step of a rollout; other rollouts pick other users); ``new``
    the slot of the new release; ``fallback`` what decides for a request without the key: its
    client address (``ip``) or the per-request weighted split (``request``). ``allow`` and
    ``deny`` rules (``header:NAME=VALUE`` or ``cookie:NAME=VALUE``) send a matching request to the
    new slot, or keep it on the old one; ``preview`` rules reach the staged slot (weight 0) of a
    blue-green or shadow. ``assign_cookie``: a request without the cookie key gets one."""

    key: str = ""
    salt: str = ""
    new: str = ""
    fallback: Literal["ip", "request"] = "ip"
    allow: list[str] = []
    deny: list[str] = []
    preview: list[str] = []
    assign_cookie: bool = False


class DesiredState(msgspec.Struct, kw_only=True):
    """What the coordinator wants one service on one node to be.

    ``slots`` maps a slot name to the release it must run; a slot that is absent must be stopped.
    ``weights`` maps slot names to integer shares of the live traffic (they need not sum to 100;
    the router normalises over the healthy slots with a positive weight). ``generation`` only grows.
    """

    schema: int = 1
    fleet: str
    node: str
    service: str
    generation: int
    slots: dict[str, ReleaseRef] = {}
    weights: dict[str, int] = {}
    mirror: MirrorSpec | None = None
    rollout: str = ""
    time: float = 0.0
    # Seconds between reads of this service's router counters that the coordinator asks for
    # while this state's wave is judged by sequential analysis (its gates can fail as soon as the
    # evidence is in, so a read's delay is exposure); 0: the agent's own periods.
    stats_every: float = 0.0
    # Set while the node is drained (``fleetwave drain``); older agents ignore it. UNSET (absent
    # from the JSON) otherwise, so that every other desired state keeps its bytes.
    drain: DrainSpec | UnsetType = UNSET
    # A canary by users, allow/deny lists or preview routes (issue 15); UNSET likewise.
    cohort: CohortSpec | UnsetType = UNSET

    @property
    def cohorts(self) -> CohortSpec | None:
        """The cohort rule in force, or None."""
        return self.cohort if isinstance(self.cohort, CohortSpec) else None

    @property
    def drained(self) -> DrainSpec | None:
        """The drain in force, or None."""
        return self.drain if isinstance(self.drain, DrainSpec) else None


class SignedEnvelope(msgspec.Struct, kw_only=True):
    """A payload signed by a coordinator key (ed25519 via nkeys).

    The signature covers ``fleet``, ``node``, ``service``, ``generation``, ``term``, ``kind`` and
    the payload bytes, so an envelope cannot be replayed to another node, service or fleet, nor to
    an older generation, nor passed off as a later leader's. ``key`` is the signer's public nkey;
    agents trust only configured keys. ``term`` is the lease term of the coordinator that wrote it
    (``coordinator.runtime.lease``); 0 from a coordinator that held no lease. ``proof``: empty
    when ``sig`` signs this envelope alone; else ``sig`` signs a batch of envelopes and ``proof``
    is this one's Merkle path to the batch's root (``protocol.signing.sign_batch``).
    """

    schema: int = 1
    kind: str = "desired"
    fleet: str
    node: str
    service: str
    generation: int
    payload: bytes
    key: str = ""
    sig: bytes = b""
    term: int = 0
    proof: bytes = b""


# -- observed state --------------------------------------------------------------------------------

SlotStatusName = Literal[
    "empty", "fetching", "starting", "healthy", "unhealthy", "draining", "stopping", "stopped",
    "failed",
]


class SlotStatus(msgspec.Struct, kw_only=True):
    """What one slot is doing now."""

    slot: str
    status: SlotStatusName = "empty"
    version: str = ""
    digest: str = ""
    pid: Pid | None = None
    port: Port | None = None
    restarts: Count = 0
    reason: str = ""
    since: float = 0.0
    last_exit: int | None = None


class SlotTraffic(msgspec.Struct, kw_only=True):
    """Router counters for one slot, cumulative since the router started (``RouterStats.epoch``).

    ``latency`` has one count per bucket of LATENCY_BOUNDS_MS plus a last overflow bucket.
    """

    requests: Count = 0
    errors: Count = 0  # 5xx answers and failed upstream attempts that reached the user
    failures: Count = 0  # upstream connection errors (retried elsewhere when possible)
    latency: list[Count] = []
    # Answers by status class ("2xx", "3xx", "4xx", "5xx"; absent: none), and the sum of every
    # latency in ``latency`` in ms (Prometheus histograms carry a true sum). Empty and 0 from a
    # router older than these fields: only ``errors`` (5xx) is known there.
    codes: dict[str, Count] = {}
    latency_sum_ms: Annotated[float, msgspec.Meta(ge=0.0, le=2.0**53)] = 0.0


class MismatchSample(msgspec.Struct, kw_only=True):
    method: str
    path: str
    what: str  # "status 200 vs 500", "body digest", "header x-foo", "json field $.id"
    live: str = ""
    shadow: str = ""


class MirrorTraffic(msgspec.Struct, kw_only=True):
    """Shadow comparison counters, cumulative since the router started."""

    mirrored: Count = 0
    compared: Count = 0
    mismatched: Count = 0
    dropped: Count = 0  # copies not sent because the shadow fell behind
    shadow_errors: Count = 0
    shadow_latency: list[Count] = []
    live_latency: list[Count] = []
    samples: list[MismatchSample] = []


class CohortTraffic(msgspec.Struct, kw_only=True):
    """How a router's cohort rule decided (issue 15), cumulative like the slot counters.

    ``users`` per slot is a KMV sketch: the ``k`` smallest 64-bit key hashes seen on that slot
    since the rule's share last changed (the hash is the rule's, salted by the rollout, so every
    node's sketches merge by union);
    ``protocol.cohort.estimate_users`` turns one into an approximate count of distinct users."""

    by_key: Count = 0  # requests decided by their key
    fallback: Count = 0  # requests without the key (decided by the fallback)
    assigned: Count = 0  # cohort cookies handed out
    allowed: Count = 0  # requests an allow or preview rule sent to the new slot
    denied: Count = 0  # requests a deny rule kept on the old slot
    users: dict[str, list[int]] = {}

    def __post_init__(self) -> None:
        # 64-bit hashes (msgspec bounds ints to int64 only, and takes any size unbounded).
        for sketch in self.users.values():
            if any(not 0 <= h < 2**64 for h in sketch):
                raise ValueError("a user hash of a cohort sketch is not a 64-bit unsigned int")


class RouterStats(msgspec.Struct, kw_only=True):
    epoch: float = 0.0  # router start time; counters reset when it changes
    pid: Pid | None = None
    port: Port | None = None
    weights: dict[str, Weight] = {}  # as applied
    slots: dict[str, SlotTraffic] = {}
    mirror: MirrorTraffic | None = None
    # Set while a cohort rule is in force; UNSET (absent) otherwise, so stats kept in rollout
    # records keep their bytes.
    cohort: CohortTraffic | UnsetType = UNSET
    # When the agent read these counters, by its own clock (0: unknown, an older agent). Two
    # snapshots of one router tell how long the window between them really is.
    time: float = 0.0
    # Set only while drained for maintenance (UNSET otherwise, so records keep their bytes):
    # "draining" while it accepts or holds client connections (how many), then "drained".
    drain: DrainPhase | UnsetType = UNSET
    connections: int | UnsetType = UNSET


class ObservedState(msgspec.Struct, kw_only=True):
    """What the agent reports for one service on its node, after every change and periodically."""

    schema: int = 1
    node: str
    service: str
    generation: Generation = 0  # the newest desired generation the agent has seen
    observed_generation: Generation = 0  # the generation it has fully converged on
    slots: dict[str, SlotStatus] = {}
    weights: dict[str, Weight] = {}
    router: RouterStats | None = None
    phase: Literal["converging", "converged", "failed"] = "converging"
    error: str = ""
    time: float = 0.0


# -- rollouts --------------------------------------------------------------------------------------

# "remove" (``fleetwave remove``): every target node gets the signed empty desired state.
Strategy = Literal["rolling", "canary", "blue-green", "shadow", "remove"]
RolloutStateName = Literal[
    "pending", "running", "paused", "succeeded", "rolled_back", "failed", "aborted"
]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "rolled_back", "failed", "aborted"})


class Gates(msgspec.Struct, kw_only=True):
    """Checks after each wave or step; None means the gate is off."""

    min_healthy: float | None = None  # fraction 0-1 of the wave's nodes healthy
    max_error_rate: float | None = None  # fraction 0-1 of new-slot requests
    max_p99_ratio: float | None = None  # p99(new) / p99(old) over the same window
    max_mismatch_rate: float | None = None  # shadow only
    min_requests: int | None = None  # fewer → inconclusive → paused
    # How error rate and p99 ratio are judged: "threshold" compares the bake window's figures
    # with the limits at its end; "sequential" weighs the evidence on every router report
    # (coordinator.core.sequential), failing at once when it crosses 1/alpha.
    analysis: Literal["threshold", "sequential"] = "threshold"
    alpha: float = 0.01  # sequential: the false-rollback probability allowed


class RolloutSpec(msgspec.Struct, kw_only=True):
    """What an operator asked for: the settings of ``fleetwave deploy`` or a rollout.toml."""

    service: str
    version: str
    strategy: Strategy = "rolling"
    selector: dict[str, str] = {}
    batch: str = "1"  # "N" or "P%"
    max_unavailable: str = "1"  # "N" or "P%"
    steps: list[str] = []  # canary: "1", "10%", ...
    weights: list[int] = []  # canary: 5, 25, 100
    bake: float = 0.0
    mirror: float = 0.0  # shadow: percent
    mirror_methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "HEAD"])
    ignore_headers: list[str] = []
    ignore_json_fields: list[str] = []
    mirror_keep_headers: list[str] = []  # shadow: --mirror-keep-header
    then: Literal["blue-green", "rolling"] | None = None
    scale_down_delay: float = 300.0
    gates: Gates = msgspec.field(default_factory=Gates)
    progress_deadline: float = 120.0
    on_failure: Literal["rollback", "pause"] = "rollback"
    # A target node lost (offline) while its wave updates or bakes: "fail" fails it at once,
    # "wait" holds the wave for it until the deadline (coordinator.core.engine_lost).
    on_node_lost: Literal["fail", "wait"] = "fail"
    # Cohorts (issue 15, ``protocol.cohort``): ``--cohort-key`` makes ``--weights`` a share of
    # users; ``--allow``/``--deny`` rules; ``--preview`` rules reach a staged slot.
    cohort_key: str = ""
    cohort_fallback: Literal["ip", "request"] = "ip"
    assign_cookie: bool = False
    allow: list[str] = []
    deny: list[str] = []
    preview: list[str] = []
    # Pre-staged waves (issue 17): how many waves ahead of the running one have their new slots
    # started and health-checked at weight 0: "" the strategy's default, "0" none, "N", "all".
    prestage: str = ""


class NodeProgress(msgspec.Struct, kw_only=True):
    """One target node in a rollout: what it had, what it must get, where it is."""

    node: str
    wave: int = -1
    state: Literal[
        "waiting", "updating", "done", "failed", "rolling_back", "rolled_back"
    ] = "waiting"
    previous: DesiredState | None = None
    target: DesiredState | None = None
    reason: str = ""
    healthy: bool = False
    version: str = ""
    # Added by the rollout engine: the last generation written for this node (generations only
    # grow), the slot that receives the new release, and whether heartbeats say the node is alive.
    generation: int = 0
    slot: str = ""
    online: bool = True
    # Pre-staging (``coordinator.core.engine_prestage``): "staging" (its new slot written at
    # weight 0 ahead of its wave), "staged" (that slot reported healthy before its wave started)
    # or "failed"; "" if never staged. ``stage_deadline``: when staging counts as failed.
    staged: Literal["", "staging", "staged", "failed"] = ""
    stage_deadline: float = 0.0


class WaveRecord(msgspec.Struct, kw_only=True):
    index: int
    nodes: list[str]
    weight: int = 100  # canary weight share for the new slot on these nodes
    state: Literal[
        "waiting", "updating", "baking", "passed", "failed", "inconclusive"
    ] = "waiting"
    started: float = 0.0
    finished: float = 0.0
    gates: dict[str, Any] = {}  # figures and thresholds of the last evaluation
    # Added by the rollout engine: when the wave's nodes must have converged, when its bake ends,
    # and the router counters of every target node when the bake started (the gates' baseline).
    deadline: float = 0.0
    bake_until: float = 0.0
    baseline: dict[str, RouterStats] = {}
    # Under --analysis sequential, the router counters of every target node when the wave
    # started, before any weight moved: its evidence counts from there (``core.engine_bake``).
    # UNSET (absent from the JSON) otherwise and once the wave is over, so a threshold
    # rollout's record is as it was, and older records decode.
    evidence_from: dict[str, RouterStats] | msgspec.UnsetType = msgspec.UNSET


class RolloutRecord(msgspec.Struct, kw_only=True):
    """A rollout as persisted in KV ``fw-<fleet>-rollouts`` (key: its id) before commands run."""

    schema: int = 1
    id: str
    spec: RolloutSpec
    release: ReleaseRef
    from_version: str = ""
    state: RolloutStateName = "pending"
    reason: str = ""
    created: float = 0.0
    updated: float = 0.0
    finished: float = 0.0
    waves: list[WaveRecord] = []
    current_wave: int = 0
    nodes: dict[str, NodeProgress] = {}
    promote: Literal["", "step", "full"] = ""
    report: RolloutReport = msgspec.field(default_factory=RolloutReport)  # protocol.report
    revision: int = 0  # bumped on every persisted change
    # Added by the rollout engine: "rollback" once the touched nodes are being restored, and the
    # deadline by which every one of them must have converged back.
    phase: Literal["forward", "rollback"] = "forward"
    rollback_deadline: float = 0.0
    # Added by the runner (never by the engine): the events of the decisions persisted with this
    # record that were not yet acknowledged by the events stream (the outbox). A coordinator that
    # resumes the rollout publishes them again under the same message ids.
    outbox: list[Event] = []
    term: int = 0  # the lease term of the coordinator that wrote it (added by the runner too)
    # Who asked (``Event.who``): who deployed it; who paused it while it is paused, who aborted
    # it, who asked for its rollback ("coordinator" when it decided so by itself).
    started_by: str = ""
    paused_by: str = ""
    aborted_by: str = ""
    rollback_by: str = ""
    # Pre-staging (issue 17): how many waves ahead of the running one are staged, resolved from
    # ``spec.prestage`` and the strategy's default when the rollout was planned (at most the
    # waves after the first); 0 in a record written before, which carries on as it did.
    prestage: int = 0
    # Added by the record split (``coordinator.core.pages``): in KV, a record of more than a
    # few nodes is a head (this record with an empty node table, empty wave member lists and
    # baselines) plus ``pages`` values ``<id>.<k>`` (``protocol.history.RolloutPage``) holding
    # them; ``node_count`` is the table's size, for the summary read off the head alone. 0 and
    # 0: the whole record is this one value (as every record written before the split).
    pages: int = 0
    node_count: int = 0
    # Started by ``fleetwave rollback SERVICE`` (not a deploy): a second such request while it
    # runs is refused, where rolling it back would return to the version being left.
    undo: bool = False


class Event(msgspec.Struct, kw_only=True):
    """One decision or observation, published on ``fw.<fleet>.evt.<kind>`` and kept in the stream.

    ``kind`` is dotted: ``node.online``, ``node.offline``, ``agent.refused``, ``slot.failed``,
    ``rollout.started``, ``wave.started``, ``gate.passed``, ``gate.failed``, ``rollout.succeeded``,
    ``rollout.rolled_back``, ``rollout.paused`` ... ``data`` carries the figures behind it.

    ``who`` caused it, for events the coordinator publishes: the caller of the API request the
    decision answered (an operator's name, proven by the server on a fleet with credentials, see
    ``protocol.subjects``), "coordinator" for the decisions it takes by itself (ticks, gates,
    nodes lost, automatic rollback), "unknown" for a request of an older CLI; "" on events the
    agents publish and on events recorded before ``who`` existed.
    """

    schema: int = 1
    id: str
    time: float
    fleet: str
    kind: str
    message: str = ""
    node: str = ""
    service: str = ""
    rollout: str = ""
    data: dict[str, Any] = {}
    who: str = ""


# -- coordinator API -------------------------------------------------------------------------------


class LeaseRecord(msgspec.Struct, kw_only=True):
    """Who leads a fleet's coordinators: the value of ``fw-<fleet>-lease/leader``.

    Written by compare-and-set only (``coordinator.runtime.lease``): ``term`` grows by one with
    every new holder; the holder re-writes it every renew interval (``renewed``: its wall clock,
    shown to operators only: no one judges expiry by another host's clock).
    """

    schema: int = 1
    holder: str  # the coordinator's id (random); "" once its holder gave it up
    term: int
    host: str = ""
    pid: int = 0
    since: float = 0.0
    renewed: float = 0.0
    ttl: float = 0.0
    key: str = ""  # the public key its desired states are signed with


class FenceMarker(msgspec.Struct, kw_only=True):
    """The value of the ``_fence`` key a leader writes into each bucket it writes, on taking
    the lease; every write of its term must find this key unchanged (``Nats-Expected-Last-
    Subject-Sequence-Subject``), so once a later leader has written its own, none gets through."""

    schema: int = 1
    term: int
    holder: str
    time: float = 0.0
    key: str = ""
    # Signing keys this fleet was rotated away from (``fleetwave auth rotate-signing-key``): a
    # coordinator with one of them refuses to lead, so two keys never lead by turns.
    retired: list[str] = []


class LeaderRequest(msgspec.Struct, kw_only=True):
    """API ``leader``: no fields (who leads, as this coordinator sees it)."""


class ApiReply(msgspec.Struct, kw_only=True):
    """Every answer of the coordinator API: ``ok`` with ``data``, or an ``error`` line and a code.

    ``code`` is ``usage`` (the request was wrong), ``conflict`` (e.g. a rollout already runs),
    ``not_found``, ``internal``, or ``accepted`` (a deploy recorded but not yet started: ``data``
    has its ``id``; the next resync starts it).
    """

    ok: bool
    data: Any = None
    error: str = ""
    code: str = ""


class Cordon(msgspec.Struct, kw_only=True):
    """An operator's hold on a node (``fleetwave cordon|drain``), kept by the coordinator in
    ``fw-<fleet>-cordons/<node>`` (never in NodeInfo, which the node writes): new rollouts skip
    the node; ``drain`` also takes its routers out of service."""

    node: str
    by: str = ""
    time: float = 0.0
    drain: bool = False
    grace: float = 0.0  # the drain's grace (seconds), when drained


class NodeView(msgspec.Struct, kw_only=True):
    """One row of ``fleetwave nodes -o json``."""

    id: str
    labels: dict[str, str] = {}
    online: bool = False
    # Not online, and not offline either: known from the nodes bucket, not heard from since the
    # coordinator started, which was too recent to tell (``coordinator.core.fleet``: ``listen``).
    unheard: bool = False
    last_seen: float | None = None
    cpu_percent: float | None = None
    mem_percent: float | None = None
    services: dict[str, Any] = {}
    cordon: Cordon | None = None  # held out of new rollouts (and drained) by an operator


class ForgetRequest(msgspec.Struct, kw_only=True):
    """``forget``: drop these offline nodes from the fleet (hosts decommissioned or replaced):
    their registration, observed states and cordon; answered ``{"nodes": [{"node",
    "forgotten"}]}``. A node's agent that comes back registers again, as a new node."""

    nodes: list[str] = []


class NodesRequest(msgspec.Struct, kw_only=True):
    """``nodes``: every node the selector matches, as a list of NodeView. With ``max_nodes``
    (the dashboard: a page of 50,000 rows is no one's reading), at most that many, those that
    want a look first (offline, cordoned), then by id, and the answer is
    ``{"nodes": [NodeView], "node_count": matched, "online": of them online, "unheard": of
    them not heard yet}``."""

    selector: dict[str, str] = {}
    max_nodes: int = 0


class DeployRequest(msgspec.Struct, kw_only=True):
    spec: RolloutSpec


# The ids of a wave a brief status names (``RolloutRequest.max_nodes``), and that people are
# shown of any wave (``coordinator.cli.render``: -o json has them all).
WAVE_IDS = 8


class RolloutRequest(msgspec.Struct, kw_only=True):
    """pause/resume/promote/abort/status of one rollout ("" = the latest). ``max_nodes``
    (status): at most this many node rows, those in motion first, and each wave's first
    ``WAVE_IDS`` ids (0: every node; ``coordinator.api.rollouts.status_dict``)."""

    id: str = ""
    full: bool = False
    max_nodes: int = 0


class CordonRequest(msgspec.Struct, kw_only=True):
    """``cordon`` and ``uncordon``: one node by id, or every node the selector matches (one of
    the two); ``drain`` (cordon only) also takes the node's routers out of service after
    ``grace`` seconds of answering 503 on their readiness path."""

    node: str = ""
    selector: dict[str, str] = {}
    drain: bool = False
    grace: float = 15.0


class RollbackRequest(msgspec.Struct, kw_only=True):
    service: str
    to_version: str = ""


class ListRolloutsRequest(msgspec.Struct, kw_only=True):
    service: str = ""
    limit: int = 50


class KeyRequest(msgspec.Struct, kw_only=True):
    """``key``: the coordinator's public signing key (what agents pass as ``--trust-key``)."""
