"""``deploy --wait``: when a followed deploy may return before its rollout ends.

    done      the rollout ended (succeeded, rolled back, failed, aborted) or waits for an
              operator (paused): the exit code says which (``rollout_cmds.EXIT_CODES``)
    switched  every node serves the new release (a blue-green switch seen on all of them);
              what is left is the post-switch bake and the warm window, inside which a rollback
              is an instant switch back: waiting through it (5 min by default) is what made
              pipelines remember ``--detach``
    started   the first wave is moving nodes: the rollout was accepted and runs by itself

A rollout that ends before the point waited for returns its own exit code, as under ``done``.
Pure: the commands poll and print.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator.errors import UsageError
from protocol.durations import format_duration
from protocol.messages import RolloutSpec

WAITS = ("done", "switched", "started")


def has_switch(spec: RolloutSpec) -> bool:
    """Whether the rollout switches every node at once (blue-green's switch wave)."""
    return spec.strategy == "blue-green" or (
        spec.strategy == "shadow" and spec.then == "blue-green")


def wait_point(spec: RolloutSpec, wait: str | None, *, detach: bool) -> str:
    """The point to follow ``spec``'s rollout to: ``wait``, or its strategy's default (switched
    for blue-green, else done); UsageError for one that cannot be reached."""
    if wait is not None and detach:
        raise UsageError("--wait and --detach contradict each other: --detach returns at once; "
                         "leave one out")
    if wait is None:
        # a shadow's own verdict is the point of following it: it is followed to its end
        return "switched" if spec.strategy == "blue-green" else "done"
    if wait == "switched" and not has_switch(spec):
        raise UsageError("--wait switched is for a rollout that switches every node at once "
                         "(--strategy blue-green, or shadow --then blue-green); use --wait done "
                         "or started")
    return wait


def reached(wait: str, st: dict[str, Any]) -> bool:
    """Whether the running rollout of status ``st`` passed the point ``wait``."""
    if st.get("state") != "running":
        return False
    if wait == "started":
        return any(w.get("state") != "waiting" for w in st.get("waves") or [])
    if wait == "switched":
        switch = (st.get("report") or {}).get("switch")
        # a spread exists only once every node was seen switched (``blue_green.switched``)
        return (st.get("phase") == "forward" and isinstance(switch, dict)
                and isinstance(switch.get("spread"), (int, float)))
    return False


def reached_lines(wait: str, st: dict[str, Any], scale_down_delay: float) -> list[str]:
    """What is true when a followed deploy returns at ``wait``, and what the operator can do."""
    rid, service = st["id"], st["service"]
    follow = f"follow the rest with 'fleetwave status {rid}'"
    if wait == "started":
        return [f"rollout {rid} started: its first wave is updating nodes; it goes on without "
                f"this command: {follow}, steer it with 'fleetwave pause|abort {rid}'"]
    switch = (st.get("report") or {}).get("switch") or {}
    until = switch.get("warm_until") or float(switch.get("at", time.time())) + scale_down_delay
    clock = time.strftime("%H:%M:%S", time.localtime(until))
    return [f"rollout {rid} switched: every node serves {st['version']}",
            f"the old slots ({st.get('from_version') or 'the previous release'}) stay warm until "
            f"at least {clock} (--scale-down-delay {format_duration(scale_down_delay)}): "
            f"'fleetwave rollback {service}' before then is an instant switch back; "
            f"the post-switch bake and gates go on: {follow}"]
