"""``${NAME}`` in a manifest's argv lists: the values only the agent knows, put into arguments.

A real server takes its port as an argument (``uvicorn --port``, ``gunicorn -b``, ``nginx -g``),
and the slot's private port is chosen by the agent when the slot starts, so a manifest writes
``["python3", "-m", "uvicorn", "app:app", "--port", "${PORT}"]`` instead of a wrapper script.

Vocabulary and rules (one scan, left to right, no recursion: a value is never scanned again):

- ``${NAME}`` with NAME one of ``AGENT_VARS`` is replaced by the value the agent also puts in the
  child's environment: ``PORT`` (the slot's private port; only for a service with a ``port``),
  ``FLEETWAVE_NODE``, ``FLEETWAVE_SLOT`` (``a`` or ``b``) and ``FLEETWAVE_VERSION``. (The
  environment also holds ``FLEETWAVE_RELEASE_DIR``, never put in an argv: a command line is
  readable by every user of the host, and the release's path is what keeps its files apart.)
- ``$$`` is one literal ``$`` (so ``$${PORT}`` is the text ``${PORT}``).
- ``$`` followed by anything else stays as it is: ``["sh", "-c", "exec app --port $PORT"]`` is
  left for the shell to expand from the environment, as before this existed.
- Any other ``${...}`` (an unknown name, ``${}``, an unclosed ``${``) is a manifest error that
  names the argument, refused when the manifest is read (``release push``, and the agent).

The manifest's own ``env`` is not a source: its values are written in the manifest already.
The same expansion applies to every argv the agent runs for a slot: ``command``, ``health.exec``,
``hooks.pre_start`` and ``hooks.validate`` (they share the slot's environment, so they share its
variables too).

Pure functions; errors are ``ProtocolError`` with one line that says what to write instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from protocol.errors import ProtocolError

AGENT_VARS = ("PORT", "FLEETWAVE_NODE", "FLEETWAVE_SLOT", "FLEETWAVE_VERSION")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KNOWN = ", ".join(f"${{{n}}}" for n in AGENT_VARS)


def _pieces(arg: str) -> list[tuple[str, bool]]:
    """``arg`` as (text, is_name) pieces; raise ValueError saying what is malformed."""
    out: list[tuple[str, bool]] = []
    i = 0
    while True:
        j = arg.find("$", i)
        if j < 0:
            out.append((arg[i:], False))
            return out
        out.append((arg[i:j], False))
        nxt = arg[j + 1:j + 2]
        if nxt == "$":
            out.append(("$", False))
            i = j + 2
        elif nxt == "{":
            end = arg.find("}", j + 2)
            if end < 0:
                raise ValueError("'${' has no closing '}' (write $$ for a literal $)")
            name = arg[j + 2:end]
            if name not in AGENT_VARS:
                what = f"${{{name}}} is not a variable fleetwave sets" if _NAME.fullmatch(name) \
                    else f"${{{name}}} is not a variable name"
                raise ValueError(f"{what}: use one of {_KNOWN}, or $$ for a literal $")
            out.append((name, True))
            i = end + 1
        else:
            out.append(("$", False))
            i = j + 1


def names_in(arg: str) -> list[str]:
    """The variables ``arg`` refers to, in order; ValueError when it is malformed."""
    return [text for text, is_name in _pieces(arg) if is_name]


def check_argv(argv: Sequence[str], *, key: str, has_port: bool) -> None:
    """Refuse an argv list whose ``${...}`` the agent could not fill, naming the argument."""
    for n, arg in enumerate(argv):
        try:
            names = names_in(arg)
        except ValueError as exc:
            raise ProtocolError(f"{key}[{n}] {arg!r}: {exc}") from None
        if "PORT" in names and not has_port:
            raise ProtocolError(
                f"{key}[{n}] {arg!r}: ${{PORT}} needs the manifest's port (a service without "
                "one gets no private port): add port = ... or remove ${PORT}"
            )


def expand_argv(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """``argv`` with every ``${NAME}`` replaced by ``values[NAME]`` and ``$$`` by ``$``.

    ProtocolError when an argument is malformed or names a value not given (a manifest that
    passed ``check_argv`` and an agent that sets every ``AGENT_VARS`` never meet either).
    """
    out = []
    for n, arg in enumerate(argv):
        try:
            pieces = _pieces(arg)
        except ValueError as exc:
            raise ProtocolError(f"argument {n} {arg!r}: {exc}") from None
        parts = []
        for text, is_name in pieces:
            if is_name and text not in values:
                raise ProtocolError(f"argument {n} {arg!r}: ${{{text}}} has no value here")
            parts.append(values[text] if is_name else text)
        out.append("".join(parts))
    return out
