"""fleetwave-agent --data-dir: an empty value is refused (Path("") is the current directory,
which the agent would fill with releases, logs and its state)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import FlagError
from agent.flags import parse_flags


def test_an_empty_data_dir_is_a_flag_error() -> None:
    """One line naming --data-dir and what to give instead."""
    with pytest.raises(FlagError) as info:
        parse_flags(["--node-id", "n1", "--data-dir", ""], environ={})
    message = str(info.value)
    assert message.startswith("Invalid value for '--data-dir': it is empty") and "\n" not in message


def test_a_directory_given_is_taken() -> None:
    """A non-empty --data-dir reaches the agent as a path; none given stays None (the default)."""
    assert parse_flags(["--node-id", "n1", "--data-dir", "d"], environ={})["data_dir"] == Path("d")
    assert parse_flags(["--node-id", "n1"], environ={})["data_dir"] is None
