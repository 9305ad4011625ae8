"""Who the routers run as (``--router-user``): their own user when given, else the services';
and a running router adopted as another user than that is named in the log (it serves on)."""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

import pytest

from agent.host.identity import RunAs
from agent.manager.routing import check_user
from agent.manager.service import NodeConfig

SVC = RunAs("svc", 1001, 1001, "/home/svc")
ROUTER = RunAs("router", 1002, 1002, "/home/router")


def _config(run_as: RunAs | None, router_as: RunAs | None) -> NodeConfig:
    return NodeConfig(fleet="f", node="n", data_dir=Path("/tmp/x"), bind_host="127.0.0.1",
                      trusted_keys=frozenset(), run_as=run_as, router_as=router_as)


@pytest.mark.parametrize(("run_as", "router_as", "want"), [
    (None, None, None), (SVC, None, SVC), (SVC, ROUTER, ROUTER), (None, ROUTER, ROUTER)])
def test_routers_run_as_their_own_user_else_the_services(
        run_as: RunAs | None, router_as: RunAs | None, want: RunAs | None) -> None:
    assert _config(run_as, router_as).routers_as == want


def test_an_adopted_router_of_another_user_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """This process stands for a router running as root (or whoever runs the tests): adopted
    where routers run as nobody, it is named with how to move it; where they run as this very
    user, nothing is said."""
    nobody = pwd.getpwnam("nobody")
    with caplog.at_level(logging.WARNING, logger="fleetwave.agent.services"):
        check_user("hello", os.getpid(), None)
        assert not caplog.records
        check_user("hello", os.getpid(),
                    RunAs(nobody.pw_name, nobody.pw_uid, nobody.pw_gid, nobody.pw_dir))
    [record] = caplog.records
    assert (f"the router of hello (pid {os.getpid()}) runs as uid {os.geteuid()}, not as "
            "nobody" in record.getMessage())
    assert f"kill {os.getpid()}" in record.getMessage()


def test_a_router_gone_meanwhile_is_not_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fleetwave.agent.services"):
        check_user("hello", 2 ** 22 + 12345, ROUTER)  # above pid_max's default: no process
    assert not caplog.records
