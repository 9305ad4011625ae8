"""The coordinator's config file (--config): [[notify]] tables with their own secrets, the
HTTP address, and unknown keys refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.errors import ConfigError
from coordinator.runtime.config import load, parse


def test_targets_with_their_own_secrets_and_the_http_address() -> None:
    """Each [[notify]] table is a target; a secret signs that target only."""
    cfg = parse('http = "127.0.66.1:9090"\n'
                '[[notify]]\nurl = "https://hooks.example.com/a"\nsecret = "s1"\n'
                '[[notify]]\nurl = "slack+https://hooks.slack.com/services/T/B/X"\n', "f")
    assert cfg.http == ("127.0.66.1", 9090)
    first, second = cfg.notify
    assert (first.url, first.secret, first.slack) == ("https://hooks.example.com/a", b"s1", False)
    assert (second.secret, second.slack) == (None, True)
    assert "s1" not in repr(first)  # a secret never shows in a log line of the target


def test_an_empty_file_configures_nothing() -> None:
    """No keys: no address, no targets."""
    cfg = parse("", "f")
    assert cfg.http is None and cfg.notify == ()


@pytest.mark.parametrize(("name", "text", "says"), [
    ("unknown top-level key", 'htp = "x"\n', "unknown key `htp`"),
    ("unknown key in a table", '[[notify]]\nurl = "http://a/"\nsekret = "s"\n',
     "unknown key `sekret` in [[notify]] #1"),
    ("missing url", '[[notify]]\nsecret = "s"\n', "url"),
    ("wrong type", '[[notify]]\nurl = 5\n', "[[notify]] #1 key url"),
    ("not a URL we post to", '[[notify]]\nurl = "ftp://x/"\n', "[[notify]] #1: notify URL"),
    ("empty secret", '[[notify]]\nurl = "http://a/"\nsecret = ""\n', "secret is empty"),
    ("bad address", 'http = "localhost"\n', "is not HOST:PORT"),
    ("not TOML", "[[notify\n", "not valid TOML"),
])
def test_bad_files_are_one_line_naming_the_problem(name: str, text: str, says: str) -> None:
    """Every mistake is a ConfigError (exit 2) of one line that says where and what."""
    with pytest.raises(ConfigError) as info:
        parse(text, "--config f.toml")
    message = str(info.value)
    assert says in message and message.startswith("--config f.toml: "), name
    assert "\n" not in message


def test_an_unreadable_file_says_so(tmp_path: Path) -> None:
    """A missing file is one line naming it."""
    with pytest.raises(ConfigError, match="cannot read it"):
        load(tmp_path / "missing.toml")


def test_flags_override_the_file() -> None:
    """--http replaces the file's address; any --notify replaces all of its targets."""
    cfg = parse('http = "127.0.66.1:9090"\n[[notify]]\nurl = "http://a/"\n', "f")
    assert cfg.under([], None) == (list(cfg.notify), ("127.0.66.1", 9090))
    flag = parse('[[notify]]\nurl = "http://b/"\n', "g").notify[0]
    assert cfg.under([flag], ("127.0.66.2", 1)) == ([flag], ("127.0.66.2", 1))
