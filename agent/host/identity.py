"""Who the agent's children run as, and what they inherit from it.

The agent holds what a service must never see: its NATS credentials (in its environment), the
state file with every service's desired state, and the other services' logs. Its children are
the service processes, their hooks and exec probes, and the per-service routers (the processes
that face the internet). They get:

- an environment rebuilt from a short list (``BASE_ENV``) plus what the child needs (``PORT``,
  the manifest's ``env``...), never the agent's own: ``FLEETWAVE_NATS`` stays with the agent;
- with ``--service-user NAME`` (``RunAs``), another user's uid, primary gid and no supplementary
  groups, so that they can read neither ``/proc/<agent>/environ`` nor the agent's data dir (the
  agent keeps it and its ``releases/`` 0711: each release is reachable by path, and readable by
  its service, but no release can be listed, nor its digest found there; the state file and the
  logs stay 0600/0700). One user for every service does not keep the services apart from one
  another: a service may read another's ``/proc/<pid>/environ`` and ``cwd`` while it runs (same
  uid), so the listing refused protects the releases that do not run (older versions, stopped
  services), not the secrets of a running neighbour. Switching users needs root (or the same
  user, a no-op), and the user must be able to run the agent's Python (the routers are ``python
  -m agent.router``): the agent checks both at start and says what to change, instead of failing
  on the first service.
- with ``--service-user SERVICE=NAME`` (repeatable; ``ServiceUsers``), that service (its
  processes, hooks and probes) runs as a user of its own instead: it then can read neither the
  other services' ``/proc/<pid>/environ`` nor their working directories, nor signal them. Its
  release is readable by that user's group alone (``releases.keep_to_group``); every other
  release by path to any user (a full digest no one can guess: never put in a command line,
  which ``ps`` shows to everyone).
- with ``--router-user NAME`` too, the routers run as a user of their own: a service then can
  neither signal its router (stop it and take its public port, which
  ``net.ipv4.ip_unprivileged_port_start`` lets any user bind) nor reach its control socket (the
  routers' socket directory is theirs, 0700), where with one user for both it could do either.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import ProtocolError

# What a child inherits from the agent's environment: enough to find programs and speak the
# host's locale, nothing that configures fleetwave itself.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")


@dataclass(frozen=True)
class RunAs:
    """The user that services, hooks, exec probes and routers run as."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str, *, who: str = "services", flag: str = "--service-user",
               python: bool = True) -> RunAs:
        """The user ``name`` (or a numeric uid) as the agent can switch to it, or ProtocolError
        (saying ``who`` would run as it, and which ``flag`` named it). ``python``: the user
        must be able to run the agent's Python (routers are Python, and run as the default
        service user unless ``--router-user``); a service's own user need not."""
        try:
            pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, OverflowError):
            raise ProtocolError(
                f"no user {name!r} on this host; create it (useradd --system {name}) or name "
                "another"
            ) from None
        if pw.pw_uid == 0:
            raise ProtocolError(f"{who} must not run as root; name an unprivileged user")
        if os.geteuid() not in (0, pw.pw_uid):
            raise ProtocolError(
                f"running {who} as {pw.pw_name!r} needs an agent started as root; start it "
                f"as root or drop {flag}"
            )
        run_as = cls(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
        for path in _python_paths() if python else []:
            if (why := run_as.cannot_read(path)) is not None:
                raise ProtocolError(
                    f"user {pw.pw_name!r} cannot run this agent's Python ({why}); install "
                    "fleetwave where that user can read it (e.g. a virtualenv in /opt/fleetwave)"
                )
        return run_as

    def cannot_read(self, path: Path) -> str | None:
        """Why this user cannot reach and read ``path`` (walking every directory above it by
        its mode bits, as the kernel would), or None if it can."""
        path = path.resolve()
        for part in [*reversed(path.parents), path]:
            try:
                st = part.stat()
            except OSError as exc:
                return f"{part}: {exc.strerror}"
            if st.st_uid == self.uid:
                bits = st.st_mode >> 6
            elif st.st_gid == self.gid:
                bits = st.st_mode >> 3
            else:
                bits = st.st_mode
            need = 0o5 if stat.S_ISDIR(st.st_mode) or part != path else 0o4
            if bits & need != need:
                return f"{part} is {stat.filemode(st.st_mode)} {_owner(st.st_uid)}"
        return None

    def spawn_kwargs(self) -> dict[str, Any]:
        """Arguments for ``asyncio.create_subprocess_exec`` that start the child as this user;
        none when it is the agent's own (setgroups() needs root even to change nothing)."""
        if self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@dataclass(frozen=True)
class ServiceUsers:
    """``--service-user``: the user services run as (``default``; None: the agent's own), and
    the services that run as a user of their own (``SERVICE=USER``)."""

    default: RunAs | None = None
    by_service: Mapping[str, RunAs] = field(default_factory=dict)

    def of(self, service: str) -> RunAs | None:
        """Who ``service``'s processes, hooks and probes run as."""
        return self.by_service.get(service, self.default)

    @property
    def given(self) -> bool:
        """Whether any service runs as another user than the agent's."""
        return self.default is not None or bool(self.by_service)

    def all(self) -> list[RunAs]:
        """Every user named, the default first."""
        return [*([self.default] if self.default is not None else []),
                *self.by_service.values()]

    @classmethod
    def parse(cls, values: tuple[str, ...]) -> ServiceUsers:
        """The flag's values: at most one ``USER`` (every service's), any ``SERVICE=USER``;
        ProtocolError (one line) for a second default, a service named twice, a malformed
        service name, or a user ``RunAs.lookup`` refuses."""
        from protocol.subjects import check_name  # (a name as the fleet's subjects take it)

        default: RunAs | None = None
        by_service: dict[str, RunAs] = {}
        looked: dict[str, RunAs] = {}  # a user named for several services is checked once

        def lookup(name: str, who: str, python: bool) -> RunAs:
            key = f"{name}/{python}"
            if key not in looked:
                looked[key] = RunAs.lookup(name, who=who, python=python)
            return looked[key]

        for value in values:
            service, sep, user = value.partition("=")
            if not sep:
                if default is not None:
                    raise ProtocolError(
                        f"{value!r}: a second user for every service ({default.name!r} was "
                        "given); name a service's own user as SERVICE=USER")
                default = lookup(value, "services", True)
                continue
            check_name("service", service)
            if service in by_service:
                raise ProtocolError(f"service {service!r} is given a user twice; keep one")
            if not user:
                raise ProtocolError(f"{value!r} names no user; write SERVICE=USER")
            by_service[service] = lookup(user, f"service {service!r}", False)
        return cls(default, by_service)


def spawn_kwargs(run_as: RunAs | None) -> dict[str, Any]:
    """``run_as.spawn_kwargs()``, or nothing when children run as the agent's own user."""
    return run_as.spawn_kwargs() if run_as is not None else {}


def child_env(run_as: RunAs | None, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child: ``BASE_ENV`` from the agent's, the user's own ``HOME``,
    ``USER`` and ``LOGNAME`` when it runs as another, then ``extra``."""
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    if run_as is not None:
        env.update(HOME=run_as.home, USER=run_as.name, LOGNAME=run_as.name)
    env.update(extra)
    return env


def _python_paths() -> list[Path]:
    """What a router needs to read to start: the interpreter, its standard library, and the
    directories fleetwave and its compiled dependencies are imported from."""
    import msgspec

    import agent

    return [Path(sys.executable), Path(sysconfig.get_paths()["stdlib"]) / "os.py",
            Path(agent.__file__), Path(msgspec.__file__)]


def _owner(uid: int) -> str:
    try:
        return f"owned by {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"owned by uid {uid}"
