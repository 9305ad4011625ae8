"""protocol.expand: ``${NAME}`` in a manifest's argv, filled from what the agent sets, and the
one-line errors for what it cannot fill."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError
from protocol.expand import AGENT_VARS, check_argv, expand_argv, names_in

VALUES = {"PORT": "41234", "FLEETWAVE_NODE": "web-7", "FLEETWAVE_SLOT": "b",
          "FLEETWAVE_VERSION": "2.0.0"}


@pytest.mark.parametrize(
    ("arg", "expanded"),
    [
        ("--port", "--port"),
        ("${PORT}", "41234"),
        ("--bind=127.0.0.1:${PORT}", "--bind=127.0.0.1:41234"),
        ("${FLEETWAVE_NODE}-${FLEETWAVE_SLOT}@${FLEETWAVE_VERSION}", "web-7-b@2.0.0"),
        ("$${PORT}", "${PORT}"),  # $$ escapes: the text itself
        ("$$${PORT}", "$41234"),  # $$ then ${PORT}
        ("$$$${PORT}", "$${PORT}"),
        ("cost: 5$", "cost: 5$"),  # a lone $ stays
        ("exec app --port $PORT", "exec app --port $PORT"),  # for a shell to expand, as before
        ("^a$|^b$", "^a$|^b$"),
        ("", ""),
    ],
)
def test_expansion_table(arg: str, expanded: str) -> None:
    """Known ${NAME}s are replaced, $$ is one $, any other $ is left as written."""
    assert expand_argv([arg], VALUES) == [expanded]


def test_a_value_is_never_scanned_again() -> None:
    """A value holding ``${...}`` or ``$$`` goes in as it is (one pass, no recursion)."""
    assert expand_argv(["${FLEETWAVE_NODE}"], {"FLEETWAVE_NODE": "${PORT}$$"}) == ["${PORT}$$"]


def test_names_in_lists_the_references_in_order() -> None:
    """names_in says which variables an argument uses, escapes excluded."""
    assert names_in("${PORT}:$${FLEETWAVE_SLOT}:${FLEETWAVE_VERSION}") == [
        "PORT", "FLEETWAVE_VERSION"]
    assert set(AGENT_VARS) == set(VALUES)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--port=${PROT}", "${PROT} is not a variable fleetwave sets: use one of ${PORT}, "
                           "${FLEETWAVE_NODE}, ${FLEETWAVE_SLOT}, ${FLEETWAVE_VERSION}, or $$"),
        ("${HOME}", "${HOME} is not a variable fleetwave sets"),
        ("${port}", "${port} is not a variable fleetwave sets"),  # names are case-sensitive
        ("${}", "${} is not a variable name"),
        ("${PORT:-80}", "${PORT:-80} is not a variable name"),
        ("--port=${PORT", "'${' has no closing '}' (write $$ for a literal $)"),
    ],
)
def test_check_refuses_what_the_agent_cannot_fill(arg: str, message: str) -> None:
    """An unknown or malformed ${...} is one line naming the key, the argument and the fix."""
    with pytest.raises(ProtocolError) as info:
        check_argv(["uvicorn", arg], key="command", has_port=True)
    text = str(info.value)
    assert text.startswith(f"command[1] {arg!r}: "), text
    assert message in text and "\n" not in text


def test_port_needs_a_port() -> None:
    """${PORT} in a worker's manifest (no port) is refused: the slot would get none."""
    check_argv(["./w", "${FLEETWAVE_SLOT}"], key="command", has_port=False)
    with pytest.raises(ProtocolError, match=r"command\[1\] '\$\{PORT\}': \$\{PORT\} needs the "
                                            r"manifest's port"):
        check_argv(["./w", "${PORT}"], key="command", has_port=False)


def test_expand_refuses_a_name_without_a_value() -> None:
    """Expanding never invents a value: a known name missing from the values is an error."""
    with pytest.raises(ProtocolError, match=r"argument 0 '\$\{PORT\}': \$\{PORT\} has no value"):
        expand_argv(["${PORT}"], {})
    with pytest.raises(ProtocolError, match=r"argument 1 .* is not a variable"):
        expand_argv(["a", "${X}"], VALUES)
