"""``--mirror-keep-header`` on its way from the command line (or a rollout.toml) to the shadow's
MirrorSpec in every node's desired state; the agent's side is in
tests/unit/agent/router/test_routing_keep_headers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.cli import main
from coordinator.core.engine import Rollout, Start, WriteDesired, new_record
from coordinator.errors import UsageError
from coordinator.strategies import shadow
from protocol.messages import DeployRequest, DesiredState, NodeView, ReleaseRef, RolloutSpec
from tests.unit.coordinator.cli.stand_in import stand_in

OLD = ReleaseRef(service="hello", version="1.0.0", digest="sha256:old")
NEW = ReleaseRef(service="hello", version="2.0.0", digest="sha256:new")
SHADOW = ["deploy", "hello", "2.0.0", "--strategy", "shadow", "--mirror", "10%", "--detach"]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[DeployRequest]:
    """The deploy requests the CLI would send (nothing is sent)."""
    requests: list[DeployRequest] = []

    def request(ctx: object, verb: str, req: Any, *, timeout: float = 0) -> dict[str, str]:
        assert verb == "deploy"
        requests.append(req)
        return {"id": "r1"}

    stand_in(monkeypatch, request)
    return requests


def deploy(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", *argv])
    assert info.value.code in (0, None)


def test_the_flag_reaches_the_spec(sent: list[DeployRequest]) -> None:
    """Repeated flags (and comma lists) become lower-case names in the spec sent."""
    deploy([*SHADOW, "--mirror-keep-header", "X-Foo", "--mirror-keep-header", "Cookie,b"])
    assert sent[0].spec.mirror_keep_headers == ["x-foo", "cookie", "b"]


def test_without_the_flag_nothing_is_kept(sent: list[DeployRequest]) -> None:
    """By default the spec keeps no header: the copies go without credentials."""
    deploy(SHADOW)
    assert sent[0].spec.mirror_keep_headers == []


def test_the_rollout_file_key(sent: list[DeployRequest], tmp_path: Path) -> None:
    """rollout.toml's mirror_keep_headers means the same as the flag."""
    f = tmp_path / "rollout.toml"
    f.write_text('service = "hello"\nversion = "2.0.0"\nstrategy = "shadow"\nmirror = "5%"\n'
                 'mirror_keep_headers = ["Authorization"]\n')
    deploy(["deploy", "-f", str(f), "--detach"])
    assert sent[0].spec.mirror_keep_headers == ["authorization"]


def test_a_bad_name_is_one_line_and_exit_2(
    sent: list[DeployRequest], capsys: pytest.CaptureFixture[str]
) -> None:
    """Something that is not a header name is refused before anything is sent."""
    with pytest.raises(SystemExit) as info:
        main(["--nats", "nats://127.0.0.1:1", *SHADOW, "--mirror-keep-header", "bad name:"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and sent == []
    assert len(err.strip().splitlines()) == 1 and "--mirror-keep-header" in err, err


def test_help_documents_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """deploy --help says what the flag does and what the default strips."""
    with pytest.raises(SystemExit):
        main(["deploy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--mirror-keep-header NAME" in text
    assert "Cookie and Authorization" in text


def stage(spec: RolloutSpec) -> list[DesiredState]:
    nodes = [NodeView(id="node-1"), NodeView(id="node-2")]
    current = {v.id: DesiredState(fleet="f", node=v.id, service="hello", generation=7,
                                  slots={"a": OLD}, weights={"a": 100}) for v in nodes}
    rec = new_record(id="sh", spec=spec, release=NEW, nodes=nodes, current=current, now=0.0)
    return [c.desired for c in Rollout(rec, fleet="f").handle(Start(), 0.0)
            if isinstance(c, WriteDesired)]


def test_the_spec_reaches_every_desired_mirror() -> None:
    """The staged nodes' MirrorSpec keeps exactly the headers the spec names; none by default."""
    spec = RolloutSpec(service="hello", version="2.0.0", strategy="shadow", mirror=10.0,
                       mirror_keep_headers=["x-foo"])
    ds = stage(spec)
    assert len(ds) == 2
    assert all(d.mirror is not None and d.mirror.keep_headers == ["x-foo"] for d in ds)
    spec.mirror_keep_headers = []
    assert all(d.mirror is not None and d.mirror.keep_headers == [] for d in stage(spec))


@pytest.mark.parametrize("field", ["mirror_keep_headers", "ignore_headers"])
def test_a_spec_from_the_api_with_a_bad_name_is_refused(field: str) -> None:
    """A spec that did not come through the CLI is checked where the strategy plans."""
    spec = RolloutSpec(service="hello", version="2.0.0", strategy="shadow", mirror=10.0)
    setattr(spec, field, ["x\r\nInjected: 1"])
    with pytest.raises(UsageError, match="is not a header name"):
        shadow.plan(["node-1"], spec)
