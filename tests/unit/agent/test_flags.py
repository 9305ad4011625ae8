"""agent.flags: argparse for the agent itself, one table shared with the click command
(``agent.main.agent_command``), and the --trust-key check. What the agent process imports:
tests/integration/test_agent_lean.py."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from agent import main as agent_main
from agent.errors import FlagError
from agent.flags import FLAGS, check_identity, parse_flags
from agent.host.identity import ServiceUsers
from agent.main import agent_command
from protocol.creds import Creds
from protocol.errors import ProtocolError
from protocol.signing import check_public_key, generate_seed, public_key


def test_defaults_and_types() -> None:
    """With only --node-id every flag has its default, typed as the agent expects it."""
    v = parse_flags(["--node-id", "n1"], environ={})
    assert v == {
        "node_id": "n1", "labels": {}, "data_dir": None, "bind_host": "127.0.0.1",
        "nats_url": "nats://127.0.0.1:4222", "fleet": "default", "heartbeat_interval": 2.0,
        "trust_keys": (), "service_user": ServiceUsers(), "router_user": None,
        "trusted_proxies": (),
        "max_connections": 4096,
        "body_timeout": 60.0, "simulate": 0, "verbose": False, "creds": None, "tls_ca": None,
        "metrics": None, "prefetch": True,
    }


@pytest.mark.parametrize(("args", "env", "want"), [
    (["--prefetch", "off"], {}, False), (["--prefetch", "ON"], {}, True),
    ([], {"FLEETWAVE_PREFETCH": "off"}, False),
    (["--prefetch", "on"], {"FLEETWAVE_PREFETCH": "off"}, True),
])
def test_prefetch_is_on_or_off(args: list[str], env: dict[str, str], want: bool) -> None:
    assert parse_flags(["--node-id", "n1", *args], environ=env)["prefetch"] is want


@pytest.mark.parametrize(("args", "env"), [
    (["--router-user", "nobody"], {}), ([], {"FLEETWAVE_ROUTER_USER": "nobody"})])
def test_router_user_is_looked_up(args: list[str], env: dict[str, str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--router-user (or its env var) names the routers' own user, as --service-user does."""
    monkeypatch.setattr("agent.host.identity._python_paths", list)  # this Python is under /root
    user = parse_flags(["--node-id", "n1", *args], environ=env)["router_user"]
    assert user is not None and user.name == "nobody"


@pytest.mark.parametrize(("value", "message"), [
    ("root", "routers must not run as root"), ("no-such-user-fw", "no user 'no-such-user-fw'")])
def test_router_user_refuses_root_and_unknown_users(value: str, message: str) -> None:
    with pytest.raises(FlagError, match=message):
        parse_flags(["--node-id", "n1", "--router-user", value], environ={})


def test_routers_sharing_the_services_user_are_warned_of() -> None:
    """With --service-user alone (or the same user twice) the routers run as the services: a
    service could stop its router and take its port; the agent says so at start."""
    from agent.host.identity import RunAs

    svc, other = RunAs("svc", 1001, 1001, "/"), RunAs("rtr", 1002, 1002, "/")
    shared = agent_main.shared_user(svc, None)
    assert shared is not None and "'svc'" in shared and "--router-user" in shared
    assert agent_main.shared_user(svc, RunAs("svc2", 1001, 1001, "/")) is not None  # same uid
    assert agent_main.shared_user(svc, other) is None
    assert agent_main.shared_user(None, other) is None
    assert agent_main.shared_user(None, None) is None
    # A service of its own user that is the routers' too (--service-user web=rtr --router-user
    # rtr) could do the same to its router.
    own = agent_main.shared_user(svc, other, {"web": RunAs("rtr", 1002, 1002, "/"),
                                              "db": RunAs("db", 1003, 1003, "/")})
    assert own is not None and "the user of web" in own and "db" not in own
    assert agent_main.shared_user(None, other, {"db": RunAs("db", 1003, 1003, "/")}) is None


def test_routers_left_to_root_beside_services_of_their_own_users_are_warned_of(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only SERVICE=USER given: the routers (facing the internet) run as the agent's user, root;
    the agent says so at start (a review found it silent)."""
    from agent.host.identity import RunAs

    own = {"db": RunAs("db", 1003, 1003, "/")}
    monkeypatch.setattr(agent_main.os, "geteuid", lambda: 0)
    said = agent_main.shared_user(None, None, own)
    assert said is not None and "root" in said and "--router-user" in said
    assert agent_main.shared_user(None, None, {}) is None  # no service user at all, as before
    monkeypatch.setattr(agent_main.os, "geteuid", lambda: 1000)
    assert agent_main.shared_user(None, None, own) is None  # not root: nothing to say


def test_command_line_beats_env_beats_default() -> None:
    """A flag given wins over its env var, which wins over the default; keys split on spaces."""
    k1, k2 = public_key(generate_seed()), public_key(generate_seed())
    env = {"FLEETWAVE_NATS": "nats://10.0.0.1:4222", "FLEETWAVE_FLEET": "prod",
           "FLEETWAVE_TRUST_KEYS": f"{k1} {k2}", "FLEETWAVE_HEARTBEAT_INTERVAL": "0.5"}
    v = parse_flags(["--node-id", "n1", "--fleet", "staging", "--label", "zone=a",
                     "--label", "role=web", "-v", "--data-dir", "/tmp/x"], environ=env)
    assert v["fleet"] == "staging" and v["nats_url"] == "nats://10.0.0.1:4222"
    assert v["trust_keys"] == (k1, k2) and v["heartbeat_interval"] == 0.5
    assert v["labels"] == {"zone": "a", "role": "web"} and v["verbose"] is True
    assert v["data_dir"] == Path("/tmp/x")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(["--node-id", "n1", "--bogus"], {}, "No such option '--bogus'.", id="unknown"),
        pytest.param(["--node-id", "n1", "stray"], {}, "unexpected extra argument", id="extra"),
        pytest.param(["--node-id"], {}, "expected one argument", id="no-value"),
        pytest.param(["--node-id", "n1", "--node"], {}, "No such option '--node'.",
                     id="no-abbreviations"),
        pytest.param(["--node-id", "bad id"], {}, "Invalid value for '--node-id': ", id="node"),
        pytest.param(["--node-id", "n1", "--simulate", "100001"], {}, "not in the range",
                     id="simulate-range"),
        pytest.param(["--node-id", "n1", "--simulate", "x"], {}, "not a valid integer",
                     id="simulate-int"),
        pytest.param(["--node-id", "n1"], {"FLEETWAVE_HEARTBEAT_INTERVAL": "0"}, "out of range",
                     id="env-checked-too"),
        pytest.param(["--node-id", "n1", "--label", "zone=a", "--label", "zone=b"], {},
                     "given twice", id="label-twice"),
        pytest.param(["--node-id", "n1", "--metrics", "9464"], {}, "is not HOST:PORT",
                     id="metrics-no-host"),
        pytest.param(["--node-id", "n1", "--metrics", "localhost:9464"], {},
                     "'localhost' is not an IP address", id="metrics-name"),
        pytest.param(["--node-id", "n1", "--metrics", "127.0.0.1:http"], {},
                     "'http' is not a port", id="metrics-port-text"),
        pytest.param(["--node-id", "n1", "--prefetch", "maybe"], {},
                     "Invalid value for '--prefetch': 'maybe' is neither on nor off",
                     id="prefetch-on-or-off"),
        pytest.param(["--node-id", "n1"], {"FLEETWAVE_METRICS": "127.0.0.1:70000"},
                     "'70000' is not a port (1-65535)", id="metrics-env-range"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    args: list[str], env: dict[str, str], message: str
) -> None:
    """Each bad flag or value is a FlagError whose one-line message names the problem."""
    with pytest.raises(FlagError) as info:
        parse_flags(args, environ=env)
    assert message in str(info.value) and "\n" not in str(info.value)


SEED = "SU" + "A" * 56


def _with_creds(args: list[str], creds: Creds | None, env: dict[str, str]) -> dict[str, object]:
    values = parse_flags(args, environ=env)
    values["creds"] = creds  # as --creds FILE would load it
    check_identity(values)
    return values


def test_the_node_id_comes_from_the_flag_its_env_or_a_nodes_creds() -> None:
    """--node-id, else FLEETWAVE_NODE_ID, else the name in a node's credentials: one file says
    who a host is."""
    web7 = Creds(fleet="default", role="node", name="web-7", seed=SEED)
    assert _with_creds([], web7, {})["node_id"] == "web-7"
    assert _with_creds([], None, {"FLEETWAVE_NODE_ID": "n2"})["node_id"] == "n2"
    assert _with_creds(["--node-id", "web-7"], web7, {})["node_id"] == "web-7"


@pytest.mark.parametrize(
    "creds",
    [None, Creds(fleet="default", role="operator", name="alice", seed=SEED)],
    ids=["nothing", "operator-creds"],
)
def test_without_a_node_id_or_a_nodes_creds_the_flag_is_missing(creds: Creds | None) -> None:
    with pytest.raises(FlagError, match="Missing option '--node-id'"):
        _with_creds([], creds, {})


def test_a_node_id_and_another_nodes_creds_disagree() -> None:
    web7 = Creds(fleet="default", role="node", name="web-7", seed=SEED)
    with pytest.raises(FlagError, match="web-7"):
        _with_creds(["--node-id", "web-8"], web7, {})


def test_a_file_is_no_data_dir(tmp_path: Path) -> None:
    """--data-dir naming an existing file is refused, as click's Path(file_okay=False) did."""
    (tmp_path / "f").write_text("")
    with pytest.raises(FlagError, match="is a file"):
        parse_flags(["--node-id", "n1", "--data-dir", str(tmp_path / "f")], environ={})


def test_the_click_command_has_the_same_flags() -> None:
    """agent_command (for the dev fleet and tests) is built from FLAGS and parses alike."""
    command = agent_main.agent_command
    assert [tuple(p.opts + p.secondary_opts) for p in command.params] == [f.opts for f in FLAGS]
    ctx = command.make_context("fleetwave-agent", ["--node-id", "n1", "--label", "zone=a"])
    assert ctx.params == {**parse_flags(["--node-id", "n1", "--label", "zone=a"], environ={}),
                          "heartbeat_interval": 2.0}


def test_router_flags_parse_into_the_edge_limits() -> None:
    """--router-* flags (and their env vars) give every router's public-port limits."""
    v = parse_flags(["--node-id", "n1", "--router-trusted-proxy", "10.0.0.0/8",
                     "--router-trusted-proxy", "192.0.2.1", "--router-body-timeout", "2500ms"],
                    environ={"FLEETWAVE_ROUTER_MAX_CONNECTIONS": "100"})
    assert v["trusted_proxies"] == ("10.0.0.0/8", "192.0.2.1")
    assert v["max_connections"] == 100 and v["body_timeout"] == 2.5


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--router-trusted-proxy", "10.0.0.0/33"], "not an IP address or network"),
     (["--router-max-connections", "0"], "below 1"),
     (["--router-max-connections", "x"], "not a valid integer"),
     (["--router-body-timeout", "0s"], "not above zero"),
     (["--router-body-timeout", "soon"], "--router-body-timeout")],
)
def test_router_flag_errors_are_usage_errors(args: list[str], needle: str) -> None:
    """A bad --router-* value stops the agent before it connects, naming the flag."""
    with pytest.raises(FlagError, match=needle):
        parse_flags(["--node-id", "n1", *args], environ={})


# -- --trust-key: text that is no coordinator key is refused at start -----------------------------


def _click_parse(*args: str) -> click.Context:
    return agent_command.make_context("fleetwave-agent", ["--node-id", "n1", *args])


def test_a_coordinator_public_key_is_accepted() -> None:
    """The key a coordinator prints is accepted as it is, also with stray spaces."""
    key = public_key(generate_seed())
    assert check_public_key(f" {key} ") == key
    assert _click_parse("--trust-key", key).params["trust_keys"] == (key,)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        pytest.param("bogus", "not an nkeys", id="garbage"),
        pytest.param("", "empty", id="empty"),
        pytest.param("seed", "seed", id="a-seed"),
        pytest.param("user", "not a coordinator", id="a-user-key"),
        pytest.param("typo", "checksum", id="one-character-off"),
    ],
)
def test_anything_else_is_refused_at_start(text: str, why: str) -> None:
    """A typo, a seed or another kind of nkey is a usage error naming the flag, not an agent that
    silently refuses every desired state."""
    import nkeys

    seed = generate_seed()
    key = public_key(seed)
    text = {
        "seed": seed.decode(),
        "user": nkeys.from_seed(nkeys.encode_seed(b"\1" * 32, nkeys.PREFIX_BYTE_USER))
        .public_key.decode(),
        "typo": key[:-2] + ("A" if key[-2] != "A" else "B") + key[-1],
    }.get(text, text)
    with pytest.raises(ProtocolError, match=why):
        check_public_key(text)
    with pytest.raises(click.BadParameter, match=why) as info:
        _click_parse("--trust-key", text)
    assert info.value.param is not None and info.value.param.name == "trust_keys"


def _ca(tmp_path: Path) -> Path:
    """A fleet's CA certificate, as 'fleetwave auth init' makes it."""
    import datetime as dt

    from coordinator.auth.pki import make_ca

    ca = tmp_path / "ca.pem"
    ca.write_bytes(make_ca("default", dt.datetime.now(dt.UTC)).cert)
    return ca


def test_a_tls_ca_that_holds_no_certificate_is_a_flag_error(tmp_path: Path) -> None:
    """--tls-ca naming a file that holds no certificate is refused at once, in one line that
    names the file (not a traceback once the agent connects); the fleet's CA is taken."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(FlagError, match=r"--tls-ca.*bad\.pem holds no usable certificate") as info:
        parse_flags(["--node-id", "n1", "--tls-ca", str(bad)], environ={})
    assert "\n" not in str(info.value)
    ca = _ca(tmp_path)
    assert parse_flags(["--node-id", "n1", "--tls-ca", str(ca)], environ={})["tls_ca"] == str(ca)


def test_creds_of_another_node_or_with_simulate_are_refused(tmp_path: Path) -> None:
    """node-1's credentials given to node-2 (or to simulated nodes) are a flag error naming
    the file node-2 needs; its own are taken, with the fleet's CA, and simulated nodes take the
    coordinator's."""
    from protocol import creds

    path = tmp_path / "node-1.creds"
    path.write_text(creds.render(creds.Creds("default", "node", "node-1", "SU" + "A" * 56)))
    ca = _ca(tmp_path)
    from agent.flags import check_identity

    own = parse_flags(["--node-id", "node-1", "--creds", str(path), "--tls-ca", str(ca)],
                      environ={})
    check_identity(own)
    assert own["creds"].name == "node-1" and own["tls_ca"] == str(ca)
    with pytest.raises(FlagError, match=r"node-2\.creds"):
        check_identity(parse_flags(["--node-id", "node-2", "--creds", str(path)], environ={}))
    with pytest.raises(FlagError, match="--simulate"):
        check_identity(parse_flags(["--node-id", "node-1", "--creds", str(path), "--simulate",
                                    "3"], environ={}))
    coordinator = tmp_path / "coordinator.creds"
    coordinator.write_text(creds.render(creds.Creds("default", "coordinator", "coordinator",
                                                    "SU" + "A" * 56)))
    check_identity(parse_flags(["--node-id", "sim", "--creds", str(coordinator), "--simulate",
                                "3"], environ={}))  # a test fleet's: may speak for them all
    with pytest.raises(FlagError, match="does not exist"):
        parse_flags(["--node-id", "n1", "--tls-ca", str(tmp_path / "nope.pem")], environ={})


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.65.1:9464", ("127.0.65.1", 9464)), ("0.0.0.0:9100", ("0.0.0.0", 9100)),
     ("[::1]:9464", ("::1", 9464))],
)
def test_metrics_takes_an_ip_and_a_port(text: str, address: tuple[str, int]) -> None:
    """--metrics (or FLEETWAVE_METRICS) is HOST:PORT with an IP literal; IPv6 in brackets."""
    assert parse_flags(["--node-id", "n1", "--metrics", text], environ={})["metrics"] == address
    assert parse_flags(["--node-id", "n1"], environ={"FLEETWAVE_METRICS": text})[
        "metrics"] == address


def test_metrics_with_simulate_is_refused_before_anything_is_bound() -> None:
    """Simulated nodes have nothing to measure: --metrics with --simulate is one line."""
    values = parse_flags(["--node-id", "n1", "--simulate", "3", "--metrics", "127.0.65.9:1"],
                         environ={})
    with pytest.raises(FlagError, match="cannot run with '--simulate'"):
        agent_main.metrics_endpoint(values)
