"""The bundle manifest: what it accepts, and the one-line errors for what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.errors import ProtocolError
from protocol.manifest import load_manifest, parse_manifest

GOOD = """
name = "hello"
version = "2.0.0"
port = 8080
command = ["python3", "app.py"]
env = { GREETING = "hi" }
[health]
http = "/healthz"
interval = "500ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 3
start_timeout = "30s"
[stop]
drain = "2s"
timeout = "10s"
[hooks]
pre_start = ["./migrate"]
validate = ["./smoke"]
"""


def test_design_example_parses() -> None:
    """The manifest of DESIGN.md parses, with durations in seconds."""
    m = parse_manifest(GOOD)
    assert (m.name, m.version, m.port) == ("hello", "2.0.0", 8080)
    assert m.health.interval == 0.5 and m.health.start_timeout == 30.0
    assert m.stop.drain == 2.0 and m.hooks.validate == ["./smoke"]
    assert m.env == {"GREETING": "hi"}


def test_worker_without_port() -> None:
    """A worker has no port and an exec (or no) health check."""
    m = parse_manifest('name="w"\nversion="1"\ncommand=["./w"]\n[health]\nexec=["./check"]\n')
    assert m.port is None and m.health.exec == ["./check"]


BASE = 'name="x"\nversion="1.0"\ncommand=["a"]\nport=80\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "colour = 1\n", "unknown key 'colour'"),
        (BASE + "[health]\nhttpp = '/'\n", "unknown key 'health.httpp'"),
        (BASE + "[stop]\ndrain = '2'\n", "stop.drain: '2' is not a duration"),
        (BASE + "[health]\ninterval = '1 s'\n", "health.interval"),
        (BASE + "[health]\ntimeout = 5\n", "health.timeout must be a duration string"),
        ('version="1"\ncommand=["a"]\n', "missing required key 'name'"),
        ('name="x"\ncommand=["a"]\n', "missing required key 'version'"),
        ('name="x"\nversion="1"\n', "missing required key 'command'"),
        ('name="x y"\nversion="1"\ncommand=["a"]\n', "service name 'x y' is not allowed"),
        ('name="x"\nversion="1/2"\ncommand=["a"]\n', "version '1/2' is not allowed"),
        ('name="x"\nversion="1"\ncommand=[]\n', "command must be a non-empty list"),
        (BASE.replace("port=80", "port=70000"), "port 70000"),
        ('name="x"\nversion="1"\ncommand=["a"]\n[health]\nhttp="/h"\n', "needs a port"),
        (BASE + "[health]\nhttp='/h'\ntcp=true\n", "one of http, tcp or exec"),
        (BASE + "[health]\nhttp='h'\n", "must be a path"),
        (BASE + "[health]\nhealthy_threshold=0\n", "healthy_threshold must be at least 1"),
        (BASE + "port = 'x'\n", "not valid TOML"),
        ("name = \n", "not valid TOML"),
        (BASE + "[health]\nhealthy_threshold='2'\n", "key 'health.healthy_threshold'"),
        (BASE.replace('["a"]', '["a", "--port", "${PROT}"]'),
         "fleetwave.toml: command[2] '${PROT}': ${PROT} is not a variable fleetwave sets"),
        ('name="w"\nversion="1"\ncommand=["w", "${PORT}"]\n',
         "fleetwave.toml: command[1] '${PORT}': ${PORT} needs the manifest's port"),
        (BASE + "[health]\nexec=['./check', '${NODE}']\n", "health.exec[1] '${NODE}'"),
        (BASE + "[hooks]\npre_start=['./m', '${X']\n", "hooks.pre_start[1] '${X': '${' has no"),
        (BASE + "[hooks]\nvalidate=['./s', '${x}']\n", "hooks.validate[1] '${x}'"),
        # Found by a review: an exec probe every microsecond, a start that always fails
        # ("not healthy within 0s"), hooks that always time out, a service name ending in a
        # newline (a regex's "$" matches before a final one).
        (BASE + "[health]\ninterval='0.001ms'\n", "health.interval must be at least 10ms"),
        (BASE + "[health]\nstart_interval='5ms'\n", "health.start_interval must be at least"),
        (BASE + "[health]\nstart_timeout='0'\n", "health.start_timeout, hooks.timeout"),
        (BASE + "[hooks]\ntimeout='0'\n", "health.start_timeout, hooks.timeout"),
        ('name="x\\n"\nversion="1"\ncommand=["a"]\n', "service name 'x\\n' is not allowed"),
    ],
)
def test_refused_with_a_message_naming_it(text: str, message: str) -> None:
    """A bad manifest is refused by one ProtocolError that names the key or value at fault."""
    with pytest.raises(ProtocolError) as info:
        parse_manifest(text, source="fleetwave.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    """A missing manifest file is a ProtocolError naming the path, not an OSError."""
    with pytest.raises(ProtocolError, match="cannot read manifest"):
        load_manifest(tmp_path / "fleetwave.toml")


def test_argv_variables_are_accepted() -> None:
    """${PORT}, the FLEETWAVE_* names and $$ pass in command, health.exec and hooks alike."""
    m = parse_manifest(
        BASE.replace('["a"]', '["uvicorn", "--port", "${PORT}", "$${HOME}"]')
        + "[health]\nexec=['./check', '${PORT}']\n"
        + "[hooks]\npre_start=['./m', '${FLEETWAVE_VERSION}']\n"
        + "validate=['./s', '${FLEETWAVE_SLOT}']\n"
    )
    assert m.command == ["uvicorn", "--port", "${PORT}", "$${HOME}"]  # filled by the agent


def test_a_long_version_is_counted_not_echoed() -> None:
    """Found by a review: a 5000-character version was repeated whole; now its length, the
    limit and the value cut."""
    with pytest.raises(ProtocolError) as info:
        parse_manifest(f'name="x"\nversion="{"1" * 5000}"\ncommand=["a"]\n', source="f.toml")
    text = str(info.value)
    assert text.startswith("f.toml: version is 5000 characters; at most 64 ('11111")
    assert len(text) < 200 and "\n" not in text
