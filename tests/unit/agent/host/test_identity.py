"""agent.host.identity: what the agent's children inherit, and the checks on --service-user."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from agent.errors import FlagError
from agent.flags import parse_flags
from agent.host.identity import BASE_ENV, RunAs, ServiceUsers, child_env
from protocol.errors import ProtocolError

USER = RunAs("svc", 4242, 4242, "/home/svc")


def test_child_env_keeps_only_the_base_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's FLEETWAVE_NATS (and anything not in BASE_ENV) never reaches a child."""
    monkeypatch.setenv("FLEETWAVE_NATS", "nats://u:pw@h")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = child_env(None, {"PORT": "1"})
    assert env["PATH"] == "/usr/bin" and env["PORT"] == "1"
    assert set(env) <= {*BASE_ENV, "PORT"}


def test_child_env_of_another_user_names_that_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME, USER and LOGNAME are the service user's, and ``extra`` wins over all."""
    monkeypatch.setenv("HOME", "/root")
    env = child_env(USER, {"LOGNAME": "custom"})
    assert (env["HOME"], env["USER"], env["LOGNAME"]) == ("/home/svc", "svc", "custom")


@pytest.mark.parametrize(
    ("name", "needle"),
    [("no-such-user-fw", "no user 'no-such-user-fw'"), ("root", "must not run as root"),
     ("0", "must not run as root")],
)
def test_lookup_refuses_unknown_users_and_root(name: str, needle: str) -> None:
    """An unknown user or root is refused with what to do."""
    with pytest.raises(ProtocolError, match=needle):
        RunAs.lookup(name)


def test_lookup_needs_root_to_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that is not root cannot run services as someone else, and is told so."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ProtocolError, match="needs an agent started as root"):
        RunAs.lookup("nobody")


def test_lookup_names_who_and_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routers' user (``--router-user``) is refused in their words, not the services'."""
    with pytest.raises(ProtocolError, match=r"^routers must not run as root"):
        RunAs.lookup("root", who="routers", flag="--router-user")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ProtocolError, match="running routers as 'nobody' needs an agent started "
                                            "as root; start it as root or drop --router-user"):
        RunAs.lookup("nobody", who="routers", flag="--router-user")


def test_cannot_read_names_the_directory_in_the_way() -> None:
    """A 0700 directory of another owner above a file makes it unreadable, and is named."""
    base = Path(tempfile.mkdtemp())  # in /tmp itself: pytest's tmp_path sits in a 0700 dir
    try:
        base.chmod(0o755)
        shut = base / "shut"
        shut.mkdir(mode=0o700)
        (shut / "python").write_bytes(b"")
        why = USER.cannot_read(shut / "python")
        assert why is not None and str(shut) in why and "drwx------" in why
        shut.chmod(0o755)
        (shut / "python").chmod(0o644)
        assert USER.cannot_read(shut / "python") is None
        (shut / "python").chmod(0o640)
        assert USER.cannot_read(shut / "python") is not None
    finally:
        shutil.rmtree(base)


def test_service_user_flag_errors_are_usage_errors() -> None:
    """--service-user with an unknown user stops the agent before it connects (exit 2)."""
    with pytest.raises(FlagError, match=r"--service-user.*no user 'no-such-user-fw'"):
        parse_flags(["--node-id", "n1", "--service-user", "no-such-user-fw"], environ={})


def _user(name: str) -> RunAs:
    import pwd

    pw = pwd.getpwnam(name)
    return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


@pytest.fixture
def any_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Users may run this Python, wherever it is (this checkout's may be under /root): the
    check itself is tested above."""
    monkeypatch.setattr("agent.host.identity._python_paths", lambda: [])


@pytest.mark.skipif(os.geteuid() != 0, reason="another user is switched to by root only")
@pytest.mark.usefixtures("any_python")
def test_services_get_the_default_user_or_one_of_their_own() -> None:
    """``--service-user nobody --service-user web=daemon --service-user db=daemon``: web and db
    run as daemon, every other service as nobody; the flag's env var takes the same words."""
    nobody, daemon = _user("nobody"), _user("daemon")
    users = ServiceUsers.parse(("nobody", "web=daemon", "db=daemon"))
    assert (users.of("web"), users.of("db"), users.of("api")) == (daemon, daemon, nobody)
    assert users.given and users.all() == [nobody, daemon, daemon]
    own = ServiceUsers.parse(("web=daemon",))
    assert (own.of("web"), own.of("api"), own.given) == (daemon, None, True)
    assert not ServiceUsers.parse(()).given
    env = parse_flags(["--node-id", "n1"], environ={"FLEETWAVE_SERVICE_USER": "nobody web=daemon"})
    assert env["service_user"] == ServiceUsers(nobody, {"web": daemon})


@pytest.mark.parametrize(("values", "needle"), [
    (("nobody", "daemon"), "a second user for every service ('nobody' was given)"),
    (("web=nobody", "web=daemon"), "service 'web' is given a user twice"),
    (("web=",), "'web=' names no user; write SERVICE=USER"),
    (("we b=nobody",), "service name 'we b' is not allowed"),
    (("web=no-such-user-fw",), "no user 'no-such-user-fw'"),
    (("web=root",), "service 'web' must not run as root"),
])
@pytest.mark.skipif(os.geteuid() != 0, reason="another user is switched to by root only")
@pytest.mark.usefixtures("any_python")
def test_a_bad_service_user_is_one_line_naming_it(values: tuple[str, ...], needle: str) -> None:
    """Each is refused before the agent connects (exit 2), saying what to write instead."""
    args = [a for v in values for a in ("--service-user", v)]
    with pytest.raises(FlagError) as err:
        parse_flags(["--node-id", "n1", *args], environ={})
    assert needle in str(err.value) and "\n" not in str(err.value), err.value


@pytest.mark.skipif(os.geteuid() != 0, reason="another user is switched to by root only")
def test_only_the_default_service_user_must_run_the_agents_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The routers (Python) run as the default service user, so it must be able to run the
    agent's Python; a service's own user need not (a review found a locked-down user of one
    service refused for it)."""
    private = tmp_path / "python"
    private.write_text("")
    private.chmod(0o600)  # root's alone
    monkeypatch.setattr("agent.host.identity._python_paths", lambda: [private])
    assert ServiceUsers.parse(("web=nobody",)).of("web") == _user("nobody")
    with pytest.raises(ProtocolError, match="user 'nobody' cannot run this agent's Python"):
        ServiceUsers.parse(("nobody",))
