"""Shadow: run the new release beside the old one, copy a share of the live requests to it, and
judge it by how its answers compare, without a user ever seeing one.

Phases, as waves (``wave`` gives their policies):

- wave 0, ``shadow``: every selected node gets the new release in its idle slot at weight 0 and a
  ``MirrorSpec(slot=new, percent=--mirror, methods, ignore_headers, ignore_json_fields,
  keep_headers)``, in one batch (no node stops serving, so max-unavailable does not bound it). By
  default only GET and HEAD are mirrored: a copied POST would have its side effects twice; and
  the copies go without the user's Cookie and Authorization unless ``--mirror-keep-header``
  names them.
- the bake: ``--bake`` seconds; the window is the difference of each router's mirror counters
  at its start and end (``coordinator.core.gates.shadow_window``: counters are cumulative and reset
  when the router's epoch changes). Gates: ``--min-requests`` compared pairs (fewer: inconclusive,
  the rollout pauses), ``--max-mismatch-rate`` (mismatched / compared), ``--max-error-rate``
  (unanswered copies / copies sent: a hanging shadow has no compared pair, yet fails it),
  ``--max-p99-ratio`` (shadow p99 / live p99) and ``--min-healthy``
  over the shadow slots. The figures, the thresholds and a few sample mismatches (node, method,
  path, what differed) go into ``record.report.shadow`` and the wave's gates.
- then, without ``--then``: the shadow is retired (every node's previous desired state again) and
  the rollout succeeds with the report; if the gates failed it is retired all the same and the
  rollout ends rolled back with the report and the reason (whatever ``--on-failure`` says: there
  is nothing to pause for, the shadow served nobody). With ``--then blue-green|rolling`` and every
  gate passed, the rollout continues as that strategy from the staged slots: a ``switch`` wave
  (blue-green) or rolling waves that move the weights, with the mirror dropped.

Formulas: ``mismatch_rate = mismatched / compared``;
``error_rate = shadow_errors / (compared + shadow_errors)``;
``p99_ratio = p99(shadow latency) / p99(live latency)`` over the same compared pairs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import UNSET

from coordinator.core import gates as gatelib
from coordinator.core import gates_shadow as shadowgates
from coordinator.core import staging
from coordinator.core.evidence import Evidence, unread
from coordinator.core.node_table import peek
from coordinator.core.planning import Wave, WaveKind
from coordinator.core.targets import restore_target
from coordinator.errors import UsageError
from coordinator.strategies.blue_green import SWITCH_AFTER_SHADOW
from coordinator.strategies.rolling import plan as rolling_plan
from coordinator.strategies.waves import AFTER_SHADOW, Ordinary, every
from protocol.messages import MirrorSpec, RolloutSpec, WaveRecord
from protocol.report import Sample, ShadowReport

if TYPE_CHECKING:  # the engine imports the strategies; this module only needs its type
    from coordinator.core.engine_step import Step  # all these hooks use of it

MAX_SAMPLES = 5
_METHOD = re.compile(r"^[A-Za-z]+\Z")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token (fullmatch)


def check_header_names(flag: str, names: list[str]) -> None:
    """Refuse what is not a header name: the router would refuse the whole configuration."""
    for name in names:
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise UsageError(f"{flag} {name!r} is not a header name; write one name per flag, "
                             f"like {flag} x-request-id")


def validate(spec: RolloutSpec) -> None:
    """The mirror's share, methods and header names, and what ``--then`` may follow with;
    ``--prestage`` has no meaning."""
    staging.refuse(spec.prestage, "shadow", "the shadow wave already starts every node's new "
                   "slot at weight 0")
    if not 0 < spec.mirror <= 100:
        raise UsageError(
            f"--mirror {spec.mirror:g}% is out of range; a shadow needs the share of requests "
            "to copy to the new release, above 0% and at most 100%, like --mirror 10%"
        )
    if not spec.mirror_methods:
        raise UsageError("--mirror-methods is empty, so nothing would be mirrored; leave it out "
                         "for GET and HEAD")
    for method in spec.mirror_methods:
        if not isinstance(method, str) or not _METHOD.match(method):
            raise UsageError(f"mirror method {method!r} is not an HTTP method; write GET, HEAD")
    check_header_names("--ignore-header", spec.ignore_headers)
    check_header_names("--mirror-keep-header", spec.mirror_keep_headers)
    if spec.then not in (None, "blue-green", "rolling"):
        raise UsageError(f"--then {spec.then!r} is not a strategy a shadow can continue as; "
                         "use --then blue-green or --then rolling")


class ShadowWave(Ordinary):
    """The shadow wave: the new release at weight 0 with a share of the live requests mirrored
    to it on every node at once, judged by ``verdict``; without ``--then``, retired when the
    rollout succeeds."""

    kind: WaveKind = "shadow"
    stages = True
    bounded = False

    def mirror(self, spec: RolloutSpec, slot: str) -> MirrorSpec | None:
        return mirror_spec(spec, slot)

    def verdict(self, step: Step, wave: WaveRecord) -> gatelib.Verdict | None:
        return verdict(step, wave)

    def succeed(self, step: Step) -> None:
        retire(step)  # report, and back to how it was


def prestage(spec: RolloutSpec) -> int:
    """Nothing staged ahead: the shadow wave stages every node."""
    return 0


SHADOW = ShadowWave()


def wave(spec: RolloutSpec, index: int) -> Ordinary:
    """Wave 0 is the shadow; after it, the waves of ``--then``: blue-green's switch, or ordinary
    rolling waves, which serve live traffic (no mismatch gate any more)."""
    if index == 0:
        return SHADOW
    return SWITCH_AFTER_SHADOW if spec.then == "blue-green" else AFTER_SHADOW


targets = every  # every selected node: a release goes to each


def plan(selected: list[str], spec: RolloutSpec) -> list[Wave]:
    """The shadow wave over every selected node, then the waves of ``--then`` if any."""
    validate(spec)
    nodes = tuple(selected)
    waves = [Wave(0, nodes, 0)]
    if spec.then == "blue-green":
        waves.append(Wave(1, nodes, 100))
    elif spec.then == "rolling":
        waves += [Wave(1 + w.index, w.nodes, w.weight) for w in rolling_plan(selected, spec)]
    return waves


def mirror_spec(spec: RolloutSpec, slot: str) -> MirrorSpec:
    """What the router on every node mirrors to the shadow ``slot``."""
    return MirrorSpec(
        slot=slot, percent=spec.mirror, methods=[m.upper() for m in spec.mirror_methods],
        ignore_headers=list(spec.ignore_headers),
        ignore_json_fields=list(spec.ignore_json_fields),
        keep_headers=list(spec.mirror_keep_headers),
    )


# -- the engine's hooks ----------------------------------------------------------------------------


def verdict(step: Step, wave: WaveRecord) -> gatelib.Verdict:
    """Judge the shadow over the bake window and write the report into the record."""
    r = step.r
    total = shadowgates.ShadowWindow()
    nodes = healthy = 0
    samples: list[Sample] = []
    evidence = Evidence()
    read = gatelib.reads_traffic(step.spec.gates)
    for n in wave.nodes:
        p = r.nodes[n]
        if p.target is None:
            continue  # already ran the release: nothing was shadowed there
        seen = step.obs.get(n)
        end = seen.router if seen is not None else None
        nodes += 1
        slot = seen.slots.get(p.slot) if seen is not None else None
        healthy += slot is not None and slot.status == "healthy"
        if read and (why := unread(wave.baseline.get(n), end, step.spec.bake)):
            evidence.add({n: why})  # its mirrored traffic is unknown, not none
            continue
        if not evidence.admits(n, wave.baseline.get(n), end):
            continue
        window = shadowgates.shadow_window(wave.baseline.get(n), end)
        total += window
        if window.mismatched and end is not None and end.mirror is not None:
            # The router keeps its latest samples; with mismatches in the window, they are
            # the window's (or close enough for a report: they are examples, not counts).
            samples += [Sample(node=n, method=s.method, path=s.path, what=s.what,
                               live=s.live, shadow=s.shadow)
                        for s in end.mirror.samples[-MAX_SAMPLES:]]
    fig = shadowgates.ShadowFigures(nodes, healthy, total, evidence.untrusted)
    result = shadowgates.evaluate_shadow(step.spec.gates, fig)
    report = step.r.report.shadow = msgspec.convert(fig.as_dict(), ShadowReport)
    report.mirror_percent = step.spec.mirror
    report.methods = [m.upper() for m in step.spec.mirror_methods]
    report.ignore_headers = list(step.spec.ignore_headers)
    report.ignore_json_fields = list(step.spec.ignore_json_fields)
    report.keep_headers = list(step.spec.mirror_keep_headers)
    report.window = [wave.bake_until - step.spec.bake, step.now]
    report.outcome = result.outcome
    report.reasons = list(result.reasons)
    report.samples = samples[:MAX_SAMPLES]
    return result


def retire(step: Step) -> None:
    """Give every staged node its previous desired state again: the shadow is stopped."""
    r = step.r
    staged = sorted(n for n, p in peek(r.nodes) if p.target is not None)
    for n in staged:
        p = r.nodes[n]
        step.write(p, restore_target(
            p.previous, fleet=step.fleet, node=n, service=step.spec.service,
            generation=step.next_generation(p), rollout=r.id, now=step.now,
        ))
    step.emit("shadow.retired", f"shadow of {r.release.version} retired on {len(staged)} nodes",
              nodes=staged, report=_report_data(step))


def _report_data(step: Step) -> dict[str, Any]:
    """The shadow's report as plain data (for the retirement's event); {} if there is none."""
    report = step.r.report.shadow
    return {} if report is UNSET else msgspec.to_builtins(report)
