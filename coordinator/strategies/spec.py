"""What every rollout spec must hold, whatever its strategy: names, ranges, finite numbers.

``coordinator.strategies.validate`` runs this (and ``check_version`` unless the spec removes its
service), then the strategy's own ``validate``; the CLI runs it before sending a deploy and the
API before accepting one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import msgspec

from coordinator.core import staging
from coordinator.core.amounts import parse_amount
from coordinator.errors import UsageError
from protocol import subjects
from protocol.cohort import CohortError, parse_key, parse_rule
from protocol.durations import MAX_SECONDS
from protocol.messages import RolloutSpec


def check_common(spec: RolloutSpec) -> None:
    """Refuse settings no strategy can carry out (ranges, non-finite numbers, bad names)."""
    subjects.check_name("service", spec.service)
    # As the CLI's durations (``protocol.durations``): the API is reachable without the CLI.
    for name, value, low in (("--bake", spec.bake, 0.0),
                              ("--scale-down-delay", spec.scale_down_delay, 0.0)):
        if not math.isfinite(value) or not low <= value <= MAX_SECONDS:
            raise UsageError(f"{name} must be a duration of 0 to a year, not {value!r}")
    if not math.isfinite(spec.progress_deadline) or not 0 < spec.progress_deadline <= MAX_SECONDS:
        raise UsageError("--progress-deadline must be a positive duration up to a year, e.g. 2m")
    parse_amount(spec.batch, flag="--batch")
    parse_amount(spec.max_unavailable, flag="--max-unavailable")
    for step in spec.steps:
        parse_amount(step, flag="--steps")
    if not 0 <= spec.mirror <= 100:
        raise UsageError(f"--mirror {spec.mirror:g}% is out of range; use 0% to 100%")
    g = spec.gates
    for name, frac in (("--min-healthy", g.min_healthy), ("--max-error-rate", g.max_error_rate),
                       ("--max-mismatch-rate", g.max_mismatch_rate)):
        if frac is not None and not 0 <= frac <= 1:
            raise UsageError(f"{name} {frac:g} is out of range; write a fraction 0-1 or a "
                             "percentage like 5%")
    if g.max_p99_ratio is not None and not (math.isfinite(g.max_p99_ratio)
                                            and g.max_p99_ratio > 0):
        raise UsageError(f"--max-p99-ratio {g.max_p99_ratio:g} must be a positive number, e.g. 1.5")
    if not 0 < g.alpha < 1:
        raise UsageError(f"--alpha {g.alpha:g} is out of range; write a probability between 0 and "
                         "1 (exclusive), e.g. 0.01 or 1%")
    if g.analysis == "sequential" and g.max_error_rate is not None and g.max_error_rate >= 1:
        raise UsageError("--max-error-rate 100% under --analysis sequential tolerates every "
                         "error rate; leave the gate out, or tolerate a smaller rise, e.g. 5%")
    if g.min_requests is not None and g.min_requests < 0:
        raise UsageError(f"--min-requests {g.min_requests} must be 0 or more")
    if any(not 0 <= w <= 100 for w in spec.weights):
        raise UsageError(f"--weights {spec.weights} must each be between 0 and 100")
    staging.check(spec.prestage)
    if spec.then is not None and spec.strategy != "shadow":
        raise UsageError("--then only follows --strategy shadow")
    check_meaning(spec)
    check_cohort(spec)


# The settings only some strategies read: (field, flag, the strategies that read it, what to
# say). A strategy that does not read a setting would ignore it, and ``deploy hello 2.0.0
# --weights 5,100`` would roll every node to 100% where a 5% canary was meant; so a setting
# other than its default is refused where it means nothing, as ``--prestage`` and
# ``--cohort-key`` are. A shadow ``--then blue-green`` ends with a blue-green switch.
_CANARY = "only a canary moves by steps and traffic weights; use --strategy canary"
_SHADOW = "only a shadow mirrors requests; use --strategy shadow --mirror 10%"
_ROLLING = ("only a rolling update moves nodes in batches (a canary moves them by --steps, a "
            "blue-green switch or a shadow all at once); use --strategy rolling (or shadow "
            "--then rolling)")
ONLY: tuple[tuple[str, str, frozenset[str], str], ...] = (
    ("batch", "--batch", frozenset({"rolling", "remove"}), _ROLLING),
    ("steps", "--steps", frozenset({"canary"}), _CANARY),
    ("weights", "--weights", frozenset({"canary"}), _CANARY),
    ("mirror", "--mirror", frozenset({"shadow"}), _SHADOW),
    ("mirror_methods", "--mirror-methods", frozenset({"shadow"}), _SHADOW),
    ("ignore_headers", "--ignore-header", frozenset({"shadow"}), _SHADOW),
    ("ignore_json_fields", "--ignore-json-field", frozenset({"shadow"}), _SHADOW),
    ("mirror_keep_headers", "--mirror-keep-header", frozenset({"shadow"}), _SHADOW),
    ("gates.max_mismatch_rate", "--max-mismatch-rate", frozenset({"shadow"}),
     "only a shadow compares the new release's answers with the old one's; use --strategy "
     "shadow --mirror 10%"),
    ("scale_down_delay", "--scale-down-delay", frozenset({"blue-green"}),
     "only a blue-green switch keeps the old slots warm; use --strategy blue-green (or "
     "shadow --then blue-green)"),
)
_DEFAULTS = RolloutSpec(service="", version="")


def _ignored(spec: RolloutSpec) -> Iterator[tuple[str, str, str]]:
    """(field, flag, hint) of each setting ``spec`` gives that its strategy would ignore."""
    strategies = {spec.strategy} | ({spec.then} if spec.then else set())
    for field, flag, readers, hint in ONLY:
        if strategies.isdisjoint(readers) and _get(spec, field) != _get(_DEFAULTS, field):
            yield field, flag, hint


def _get(spec: RolloutSpec, field: str) -> object:
    """``field`` of ``spec``, a dotted path for a gate (``gates.max_mismatch_rate``)."""
    value: object = spec
    for name in field.split("."):
        value = getattr(value, name)
    return value


def check_meaning(spec: RolloutSpec) -> None:
    """Refuse a setting the strategy would ignore (``ONLY``), naming the flag and what to use."""
    for _, flag, hint in _ignored(spec):
        raise UsageError(f"{flag} has no meaning with --strategy {spec.strategy}: {hint}, "
                         f"or leave {flag} out")


def without_ignored(spec: RolloutSpec) -> RolloutSpec:
    """``spec`` with every setting its strategy ignores back at its default: what a rollback
    reuses of a record that an older coordinator accepted with one (``--batch`` on a canary,
    say), so that its rollback is not refused for a setting that never meant anything."""
    for field, _, _ in list(_ignored(spec)):
        if "." in field:
            group, name = field.split(".")
            part = getattr(spec, group)
            spec = msgspec.structs.replace(spec, **{group: msgspec.structs.replace(
                part, **{name: _get(_DEFAULTS, field)})})
        else:
            spec = msgspec.structs.replace(spec, **{field: _get(_DEFAULTS, field)})
    return spec


def check_cohort(spec: RolloutSpec) -> None:
    """Cohorts (issue 15): the key and rules parse, and the strategy gives them a meaning.

    A share of users needs every node to split by the same rule at the same time: a canary by
    ``--weights`` alone (with ``--steps`` some nodes would run the old release only, and a user
    would meet both versions). Allow/deny lists likewise; ``--preview`` reaches the staged slot
    of a blue-green or shadow, where nothing else reaches it. A rolling update moves whole nodes
    and has no second slot to send anyone to."""
    try:
        if spec.cohort_key:
            parse_key(spec.cohort_key)
        for flag, rules in (("--allow", spec.allow), ("--deny", spec.deny),
                            ("--preview", spec.preview)):
            for rule in rules:
                parse_rule(rule, flag)
    except CohortError as exc:
        raise UsageError(str(exc)) from None
    by_users = bool(spec.cohort_key or spec.allow or spec.deny)
    if by_users and spec.strategy != "canary":
        flag = "--cohort-key" if spec.cohort_key else "--allow" if spec.allow else "--deny"
        hint = ("; to let testers reach the staged release use --preview header:NAME=VALUE"
                if spec.strategy in ("blue-green", "shadow") else "")
        raise UsageError(f"{flag} has no meaning with --strategy {spec.strategy}: only a canary "
                         f"by --weights splits users between versions; use --strategy canary "
                         f"--weights 5,25,100{hint}")
    if by_users and (spec.steps or not spec.weights):
        raise UsageError("a canary by users needs --weights alone (e.g. --weights 5,25,100): "
                         "with --steps, or none, some nodes would run only one version and a "
                         "user would meet both; drop --steps")
    if spec.preview and spec.strategy not in ("blue-green", "shadow"):
        raise UsageError(f"--preview reaches a staged release, which --strategy {spec.strategy} "
                         "does not have; use --allow with a canary, or --strategy blue-green")
    if spec.cohort_fallback != "ip" and not spec.cohort_key:
        raise UsageError("--cohort-fallback says what decides without the cohort key; give "
                         "--cohort-key too")
    if spec.assign_cookie and not spec.cohort_key.startswith("cookie:"):
        raise UsageError("--assign-cookie hands out the cohort cookie, so it needs "
                         "--cohort-key cookie:NAME")
    if spec.weights and spec.weights[0] == 0 and not spec.allow:
        raise UsageError("--weights starting at 0 exposes the new release to nobody; add "
                         "--allow header:NAME=VALUE for the users who should see it first")


def check_version(spec: RolloutSpec) -> None:
    """Refuse a version no release can have (every spec that deploys a release names one)."""
    if not spec.version or len(spec.version) > 128 or not spec.version.isprintable():
        raise UsageError(f"version {spec.version!r} is not a release version; write e.g. 2.0.0")
