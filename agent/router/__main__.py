"""``python -m agent.router --control SOCK [--control-fd N] [--detach]``: run one router process.

With ``--control-fd`` the control socket is already bound at SOCK and listening on that
inherited descriptor (the agent makes it: ``agent.router.control.start_router``); without it the
router makes SOCK itself (a router started by hand, by tests).

With ``--detach`` the process forks at once and the parent exits 0, so whoever started it can reap
it immediately; the child goes on in its own session with no tie to its starter (which may be
killed at any time: the router keeps serving). Output goes wherever the starter pointed it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from agent.errors import RouterUnavailable
from agent.router.control import RouterClient, check_socket_path, remove_stale_socket
from agent.router.server import RouterServer
from protocol import loop


async def _serve(socket_path: Path, control: socket.socket | None) -> int:
    # Local metadata calls on a socket file: instant, and nothing else runs on the loop yet.
    if control is None and socket_path.exists():  # noqa: ASYNC240
        try:
            pid = await RouterClient(socket_path, timeout=1.0).ping()
        except RouterUnavailable as exc:
            try:
                await remove_stale_socket(socket_path, exc, 1.0)
            except RouterUnavailable:
                print(f"router: {exc}; not starting a second one", file=sys.stderr)
                return 1
        else:
            print(f"router: a router (pid {pid}) already runs on {socket_path}", file=sys.stderr)
            return 1
    await RouterServer(socket_path, control).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.router")
    parser.add_argument("--control", required=True, type=Path, help="unix socket to listen on")
    parser.add_argument("--control-fd", type=int, default=None,
                        help="the control socket, bound at --control and listening, inherited")
    parser.add_argument("--detach", action="store_true", help="fork and let the parent exit")
    args = parser.parse_args(argv)
    socket_path: Path = args.control
    control: socket.socket | None = None
    if args.control_fd is not None:
        try:
            control = socket.socket(fileno=args.control_fd)
        except OSError as exc:
            print(f"router: no control socket on descriptor {args.control_fd}: {exc.strerror}",
                  file=sys.stderr)
            return 2
        if control.family != socket.AF_UNIX or control.type != socket.SOCK_STREAM:
            control.detach()  # not ours to close
            print(f"router: descriptor {args.control_fd} is not a unix stream socket",
                  file=sys.stderr)
            return 2
    try:
        check_socket_path(socket_path)
    except RouterUnavailable as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    if args.detach:
        # Forking before any thread or event loop exists is safe; the parent only exits.
        if os.fork() > 0:
            os._exit(0)
        with contextlib.suppress(OSError):
            os.setsid()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s router[{os.getpid()}] %(levelname)s %(message)s",
    )
    code = 1

    async def go() -> None:
        nonlocal code
        code = await _serve(socket_path, control)

    loop.run(go())
    return code


if __name__ == "__main__":
    sys.exit(main())
