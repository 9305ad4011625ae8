"""How a canary by users reads in ``status`` and in a followed ``deploy``."""

from __future__ import annotations

from typing import Any

from coordinator.cli.render import gates_text, progress_lines, status_text

SHARE = "20 % of users (header X-User; no key: client IP)"


def _status(state: str, gates: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "r1", "service": "hello", "version": "2.0.0", "from_version": "1.0.0",
            "strategy": "canary", "state": "running", "reason": "", "phase": "forward",
            "current_wave": 0, "report": {}, "nodes": {},
            "waves": [{"index": 0, "nodes": ["node-1"], "weight": 20, "state": state,
                       "gates": gates or {}, "share": SHARE}]}


def test_status_and_follow_say_users() -> None:
    """The wave's weight reads as a share of users in status and when a followed wave starts."""
    assert f"at {SHARE} on node-1" in status_text(_status("baking"))
    lines = progress_lines(_status("waiting"), _status("updating"))
    assert any(f"wave 1: updating ({SHARE})" in line for line in lines), lines


def test_gate_figures_name_the_users_on_each_side() -> None:
    """The gates' figures add the users seen on each side and the requests without the key."""
    text = gates_text({"outcome": "pass", "requests": 10, "users_new": 98, "users_old": 391,
                       "fallback_requests": 3})
    assert "users ~98 new / ~391 old, 3 req without the key" in text
