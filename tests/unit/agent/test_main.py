"""agent.main: a failure the user can fix is one line, also when it comes out of the agent's
TaskGroups; anything else is a bug (its traceback logged)."""

from __future__ import annotations

from agent.errors import StartupError
from agent.main import _fixable
from protocol.errors import BusError, ProtocolError


def test_a_fixable_failure_from_inside_task_groups_is_its_one_line() -> None:
    """A ProtocolError (a state file that cannot be read), a BusError or a StartupError raised
    in nested TaskGroups is told by its message; a bug, alone or beside one of them, is not."""
    why = "cannot read agent state /d/state.json: Permission denied"
    nested = ExceptionGroup("agent", [ExceptionGroup("services", [ProtocolError(why)])])
    assert _fixable(nested) == why
    assert _fixable(ProtocolError(why)) == why
    assert _fixable(BusError("refused")) == "refused"
    assert _fixable(StartupError("no data dir")) == "no data dir"
    assert _fixable(KeyError("slot")) is None
    assert _fixable(ExceptionGroup("agent", [KeyError("slot")])) is None
    assert _fixable(ExceptionGroup("agent", [ProtocolError(why), KeyError("slot")])) is None
