"""Nodes lost mid-wave: what the rollout's ``on_node_lost`` policy does with them.

Vocabulary: a target node is *lost* when the coordinator's node table says it is offline (no
heartbeats; the runner turns that into ``NodeOffline``) while the wave it belongs to is in
progress (``updating``) or baking, and the node has not failed already. Nodes of waves already
passed or not yet started that go offline are not lost in this sense: they count against
max-unavailable like any unavailable node (``Step.unavailable``), and one still offline when its
own wave starts is lost then. A node that was offline before the rollout is not a target at all
(``record.report.skipped_offline``).

Policies (``RolloutSpec.on_node_lost``, ``--on-node-lost``):

- ``fail`` (the default): a lost node fails at once with a reason naming its wave ("lost
  (offline) during wave 1 while updating"); the wave fails with the node named, and goes to
  ``--on-failure`` as for any failed node.
- ``wait``: the wave waits for it. A lost node stays as it is (updating, done, or waiting to be
  started) and counts as unavailable, so max-unavailable still holds and no node beyond the
  budget is started; it is never judged done while it is lost. If it comes back and converges,
  the wave goes on. If it is not back (and converged) by the wave's deadline (``--progress-
  deadline`` from the wave's start) it fails as under ``fail``, saying it was not back in time.
  A node lost during the bake holds the bake's verdict (as Flagger halts its analysis while the
  canary is not ready, bounded by its progress deadline): the verdict waits until it is back and
  has reported again, but never past the bake's end plus ``--progress-deadline``, when it fails.
  What it reported before it was lost is dropped when it comes back (``returned``), so its health
  and figures are judged on a report made after its return: router counters are cumulative, so
  the window since the baseline still holds every request it answered while the coordinator could
  not hear it. An operator's promote skips gates, not lost nodes.

Neither policy writes to a lost node: a node is started only while it is online, and a lost node
that comes back reads the desired state already written for it. The only write a lost node can
get is the next generation that everyone gets (a rollback, or the retirement of the old slots),
once.
"""

from __future__ import annotations

from coordinator.core.engine_step import Step
from coordinator.core.engine_types import peek_node
from protocol.durations import format_duration
from protocol.messages import NodeProgress, WaveRecord

# Node states in which an offline node of the current wave is lost (a failed node is past it).
LOSABLE = frozenset({"waiting", "updating", "done"})
_WHILE = {"waiting": "before it was started", "updating": "while updating",
          "done": "after converging"}


class Lost:
    """The lost nodes of a wave and the ``on_node_lost`` policy, over one working ``Step``."""

    def __init__(self, step: Step) -> None:
        self.step = step

    @property
    def waits(self) -> bool:
        """Whether the policy is ``wait``."""
        return self.step.spec.on_node_lost == "wait"

    def nodes(self, wave: WaveRecord, *, baking: bool = False) -> list[NodeProgress]:
        """The wave's lost nodes: offline, and neither failed nor past the wave; while it bakes
        under ``wait``, also those back online that have not reported since (``returned``)."""
        r = self.step.r
        unheard = baking and self.waits
        return [r.nodes[n] for n in wave.nodes  # taken (copied) only when lost: ``peek_node``
                if (p := peek_node(r.nodes, n)).state in LOSABLE
                and (not p.online or (unheard and n not in self.step.obs))]

    def judge(self, wave: WaveRecord, *, baking: bool = False) -> list[NodeProgress]:
        """Apply the policy to the wave's lost nodes now; return those still lost.

        Under ``fail`` every lost node fails (and none is left); under ``wait`` they are left
        as they are until the wave's deadline (``deadline``), when they fail.
        """
        lost = self.nodes(wave, baking=baking)
        if not lost:
            return []
        if not self.waits:
            for p in lost:
                self.fail(p, wave, "while baking" if baking else _WHILE[p.state])
            return []
        deadline = self.deadline(wave, baking=baking)
        if not self.step.passed(deadline):
            return lost
        limit = format_duration(self.step.spec.progress_deadline)
        for p in lost:
            self.fail(p, wave, f"while baking and not back (online and reporting) within "
                      f"{limit} of the bake's end" if baking else f"and not back within {limit}")
        return []

    def returned(self, node: str) -> None:
        """``node`` is back online: if its wave bakes and waits for it, forget what it reported
        before it was lost, so that the verdict waits for a report made since."""
        r = self.step.r
        p = r.nodes.get(node)
        if (self.waits and p is not None and p.wave == r.current_wave
                and r.waves[r.current_wave].state == "baking" and p.state in LOSABLE):
            self.step.see(node, None)

    def deadline(self, wave: WaveRecord, *, baking: bool) -> float:
        """By when a lost node of ``wave`` must be back: the wave's deadline while it updates;
        ``--progress-deadline`` past the bake's end while it bakes."""
        if baking:
            return wave.bake_until + self.step.spec.progress_deadline
        return wave.deadline

    def fail(self, p: NodeProgress, wave: WaveRecord, how: str) -> None:
        """Fail a lost node with the reason every failure of a lost node has."""
        self.step.fail_node(p, f"lost (offline) during wave {wave.index + 1} {how}")

    def waiting_note(self, node: str) -> str:
        """What the announcement of a target node going offline adds under ``wait``: which
        wave waits for it, or "" if it is not lost (or the policy is ``fail``)."""
        r = self.step.r
        p = r.nodes.get(node)
        if not self.waits or p is None or p.wave != r.current_wave or p.state not in LOSABLE:
            return ""
        wave = r.waves[r.current_wave]
        if r.state != "running" or r.phase != "forward" or wave.state not in ("updating",
                                                                             "baking"):
            return ""
        return f"; wave {wave.index + 1} waits for it (on-node-lost wait)"
