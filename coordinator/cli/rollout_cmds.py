"""``fleetwave deploy|status|rollouts|events|pause|resume|promote|abort|rollback``.

``deploy`` turns flags, or a ``rollout.toml`` with the same keys (snake_case: ``max_unavailable``),
into a RolloutSpec: both go through one path, ``build_spec``, so a file and the flags can never
disagree on what a value means. Flags given on the command line override the file. Bad values are
one line and exit 2, before anything is sent.

Following a rollout (``deploy`` without ``--detach``) polls ``status`` twice a second and draws it
(rich Live on a terminal, one line per change otherwise). A coordinator that stops answering for a
while (it restarts) is waited for up to ``FOLLOW_PATIENCE``. Exit codes: 0 succeeded, 3 rolled
back, 4 paused or failed (an operator must act), 1 aborted or error, 2 usage.

Why one long module: ``deploy`` alone has some thirty flags, each parsed and refused in one
line here, and the other commands share its rendering of a rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import stat
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

import coordinator.cli.client as client
from coordinator import strategies
from coordinator.cli import base
from coordinator.cli.base import Ctx, cli, output_option
from coordinator.cli.render import (
    brief,
    event_line,
    progress_lines,
    rollouts_table,
    safe,
    shadow_report_lines,
    status_renderable,
    status_text,
)
from coordinator.cli.waiting import WAITS, reached, reached_lines, wait_point
from coordinator.core.amounts import parse_amount
from coordinator.core.fleet import parse_selector
from coordinator.errors import ConfigError, FleetwaveError, RemoteError, UsageError
from coordinator.strategies import shadow
from protocol import subjects
from protocol.codec import convert, encode
from protocol.durations import parse_duration
from protocol.errors import BusError, NotReachable, ProtocolError
from protocol.events import received_all
from protocol.messages import (
    DeployRequest,
    Event,
    Gates,
    ListRolloutsRequest,
    RollbackRequest,
    RolloutRequest,
    RolloutSpec,
)

if TYPE_CHECKING:
    from rich.live import Live

# How often a followed rollout is read at the latest: each of its rollout, wave and gate events
# (heard on the events' subjects) has it read at once, so its end is noticed within a round
# trip (it was 0.125 s late on average polling every 0.25 s; issue 17); each read is one
# status request (about 0.5 ms of the leader's time), all on one connection.
POLL = 0.25
# The node rows a poll of a followed rollout asks for (``status_dict``'s max_nodes): a rollout of
# more shows its nodes in motion and counts of the rest. A full status of 50,000 nodes is 7 MB
# and ~70 ms of the leader's time; four a second would slow the rollout being followed.
FOLLOW_NODES = 200
FOLLOWED_KINDS = ("rollout.>", "wave.>", "gate.>")
# What -o json follows to its end (--wait done): it prints the last status only, and every
# state it can end in has a rollout event; a read at each wave and gate event (two or three a
# wave) only competed for the CPU with the waves' cold starts.
ENDING_KINDS = ("rollout.>",)
FOLLOW_PATIENCE = 60.0  # how long a silent coordinator is waited for while following
EXIT_CODES = {"succeeded": 0, "rolled_back": 3, "paused": 4, "failed": 4, "aborted": 1}
EXIT_ACCEPTED = 5  # --detach: the rollout is recorded, its start not confirmed (a bus error)


class RolloutFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The keys of a rollout.toml (and of the deploy flags, with dashes for underscores)."""

    service: str | None = None
    version: str | None = None
    strategy: str | None = None
    selector: dict[str, str] | list[str] | str | None = None
    batch: str | int | None = None
    max_unavailable: str | int | None = None
    steps: list[str | int] | str | None = None
    weights: list[int] | str | None = None
    bake: str | None = None
    mirror: str | float | None = None
    mirror_methods: list[str] | str | None = None
    ignore_headers: list[str] | str | None = None
    ignore_json_fields: list[str] | str | None = None
    mirror_keep_headers: list[str] | str | None = None
    then: str | None = None
    scale_down_delay: str | None = None
    min_healthy: str | float | None = None
    max_error_rate: str | float | None = None
    max_p99_ratio: str | float | None = None
    max_mismatch_rate: str | float | None = None
    min_requests: str | int | None = None
    analysis: str | None = None
    alpha: str | float | None = None
    progress_deadline: str | None = None
    on_failure: str | None = None
    on_node_lost: str | None = None
    cohort_key: str | None = None
    cohort_fallback: str | None = None
    assign_cookie: bool | None = None
    allow: list[str] | str | None = None
    deny: list[str] | str | None = None
    preview: list[str] | str | None = None
    prestage: str | int | None = None


STRATEGIES = ("rolling", "canary", "blue-green", "shadow")


def build_spec(settings: dict[str, Any]) -> RolloutSpec:
    """A RolloutSpec from rollout.toml keys (values as TOML or flag text); UsageError says why."""
    f = convert(RolloutFile, settings, what="rollout settings")
    if not f.service or not f.version:
        raise UsageError("deploy needs a SERVICE and a VERSION (as arguments or in the file)")
    spec = RolloutSpec(service=f.service, version=f.version)
    if f.strategy is not None:
        spec.strategy = _choice("--strategy", f.strategy, STRATEGIES)  # type: ignore[assignment]
    if f.selector is not None:
        items = [f"{k}={v}" for k, v in f.selector.items()] if isinstance(f.selector, dict) \
            else [f.selector] if isinstance(f.selector, str) else f.selector
        spec.selector = parse_selector(items, what="--selector")
    if f.batch is not None:
        spec.batch = str(f.batch)
        parse_amount(spec.batch, flag="--batch")
    if f.max_unavailable is not None:
        spec.max_unavailable = str(f.max_unavailable)
        parse_amount(spec.max_unavailable, flag="--max-unavailable")
    if f.steps is not None:
        spec.steps = [str(s).strip() for s in _items(f.steps)]
    if f.weights is not None:
        spec.weights = [_int("--weights", w) for w in _items(f.weights)]
    if f.bake is not None:
        spec.bake = parse_duration(f.bake, what="--bake")
    if f.mirror is not None:
        spec.mirror = _fraction("--mirror", f.mirror) * 100
    if f.mirror_methods is not None:
        spec.mirror_methods = [_method(m) for m in _names(f.mirror_methods)]
        if not spec.mirror_methods:
            raise UsageError("--mirror-methods is empty, so nothing would be mirrored; leave it "
                             "out for GET and HEAD")
    if f.ignore_headers is not None:
        spec.ignore_headers = [_header("--ignore-header", h) for h in _names(f.ignore_headers)]
    if f.ignore_json_fields is not None:
        spec.ignore_json_fields = [_json_field(p) for p in _names(f.ignore_json_fields)]
    if f.mirror_keep_headers is not None:
        spec.mirror_keep_headers = [
            _header("--mirror-keep-header", h) for h in _names(f.mirror_keep_headers)
        ]
    if f.then is not None:
        spec.then = _choice("--then", f.then, ("blue-green", "rolling"))  # type: ignore[assignment]
    if f.scale_down_delay is not None:
        spec.scale_down_delay = parse_duration(f.scale_down_delay, what="--scale-down-delay")
    if f.progress_deadline is not None:
        spec.progress_deadline = parse_duration(f.progress_deadline, what="--progress-deadline")
    if f.on_failure is not None:
        spec.on_failure = _choice(  # type: ignore[assignment]
            "--on-failure", f.on_failure, ("rollback", "pause"))
    if f.on_node_lost is not None:
        spec.on_node_lost = _choice(  # type: ignore[assignment]
            "--on-node-lost", f.on_node_lost, ("fail", "wait"))
    if f.cohort_key is not None:
        spec.cohort_key = f.cohort_key.strip()
    if f.cohort_fallback is not None:
        spec.cohort_fallback = _choice(  # type: ignore[assignment]
            "--cohort-fallback", f.cohort_fallback, ("ip", "request"))
    if f.assign_cookie is not None:
        spec.assign_cookie = f.assign_cookie
    # Rules are taken whole (a value may hold a comma); spec.check_cohort parses them.
    spec.allow = _rules(f.allow)
    spec.deny = _rules(f.deny)
    spec.preview = _rules(f.preview)
    if f.prestage is not None:
        spec.prestage = str(f.prestage).strip()  # checked by strategies.validate below
    spec.gates = Gates(
        min_healthy=None if f.min_healthy is None else _fraction("--min-healthy", f.min_healthy),
        max_error_rate=None if f.max_error_rate is None
        else _fraction("--max-error-rate", f.max_error_rate),
        max_p99_ratio=None if f.max_p99_ratio is None
        else _float("--max-p99-ratio", f.max_p99_ratio),
        max_mismatch_rate=None if f.max_mismatch_rate is None
        else _fraction("--max-mismatch-rate", f.max_mismatch_rate),
        min_requests=None if f.min_requests is None
        else _int("--min-requests", f.min_requests),
    )
    if f.analysis is not None:
        spec.gates.analysis = _choice(  # type: ignore[assignment]
            "--analysis", f.analysis, ("threshold", "sequential"))
    if f.alpha is not None:
        spec.gates.alpha = _fraction("--alpha", f.alpha)
    # What needs no fleet to judge is refused here, before anything is sent: the same checks
    # the API runs on every deploy.
    strategies.validate(spec)
    return spec


def _rules(value: list[str] | str | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _items(value: list[Any] | str) -> list[Any]:
    return [p for p in value.split(",") if p.strip()] if isinstance(value, str) else value


def _names(value: list[str] | str) -> list[str]:
    """Repeated flags, comma-separated lists, or both: ``["a,b", "c"]`` → ``["a", "b", "c"]``."""
    return [p.strip() for v in ([value] if isinstance(value, str) else value)
            for p in str(v).split(",") if p.strip()]


def _method(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z]+", value):
        raise UsageError(f"--mirror-methods {value!r} is not an HTTP method; write a list like "
                         "GET,HEAD,OPTIONS")
    return value.upper()


def _header(flag: str, value: str) -> str:
    name = str(value).strip()
    shadow.check_header_names(flag, [name])
    return name.lower()


def _json_field(value: str) -> str:
    """A dotted path into a JSON answer (``id``, ``$.meta.time``); no empty parts."""
    path = str(value).strip()
    if not path or any(not part for part in path.removeprefix("$.").split(".")):
        raise UsageError(f"--ignore-json-field {value!r} is not a dotted field path; write "
                         "names like version or meta.time (comma-separated or repeated)")
    return path


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    return value


def _int(flag: str, value: str | int) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a whole number") from None


def _float(flag: str, value: str | float) -> float:
    """A positive finite number: JSON carries nan and inf as null, which would drop the gate."""
    try:
        number = float(str(value).strip())
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a number, e.g. 1.5") from None
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"{flag} {value!r} must be a positive number, e.g. 1.5")
    return number


def _fraction(flag: str, value: str | float) -> float:
    """``5%`` or ``0.05`` → 0.05; refuses anything outside 0-1."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a percentage like 5% or a fraction like "
                         "0.05") from None
    if not 0 <= number <= 1:
        raise UsageError(f"{flag} {value!r} is out of range; use 0% to 100% (or 0 to 1)")
    return number


MAX_ROLLOUT_FILE = 1024 * 1024  # a real rollout.toml is a few hundred bytes


def read_rollout_file(path: Path) -> dict[str, Any]:
    """The settings of a rollout.toml; ConfigError (exit 2) if it is not readable TOML."""
    try:
        data = tomllib.loads(_read_capped(path).decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        convert(RolloutFile, data, what=str(path))  # unknown keys named with the file
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None
    return data


def _read_capped(path: Path) -> bytes:
    """A regular file of at most MAX_ROLLOUT_FILE bytes: ``-f /dev/zero`` would never end, and a
    fifo would wait for a writer (O_NONBLOCK opens it without waiting, to refuse it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file; -f takes a rollout.toml")
        data = f.read(MAX_ROLLOUT_FILE + 1)
    if len(data) > MAX_ROLLOUT_FILE:
        raise ConfigError(f"{path}: larger than 1 MiB, the limit for a rollout file")
    return data


# -- deploy ----------------------------------------------------------------------------------------

_FLAGS = ("strategy", "selector", "batch", "max_unavailable", "steps", "weights", "bake",
          "mirror", "mirror_methods", "ignore_headers", "ignore_json_fields",
          "mirror_keep_headers", "then",
          "scale_down_delay", "min_healthy", "max_error_rate", "max_p99_ratio",
          "max_mismatch_rate", "min_requests", "analysis", "alpha", "progress_deadline",
          "on_failure", "on_node_lost", "cohort_key", "cohort_fallback", "assign_cookie",
          "allow", "deny", "preview", "prestage")


@cli.command()
@click.argument("service", required=False)
@click.argument("version", required=False)
@click.option("-f", "--file", "file", type=click.Path(dir_okay=False, path_type=Path),
              help="A rollout.toml with the same settings as these flags.")
@click.option("--strategy", help="rolling (default), canary, blue-green or shadow.")
@click.option("--selector", multiple=True, metavar="KEY=VALUE",
              help="Only nodes with this label (repeatable; all must match).")
@click.option("--batch", metavar="N|P%", help="Nodes per wave (rolling).")
@click.option("--max-unavailable", metavar="N|P%", help="Target nodes allowed down at once.")
@click.option("--steps", metavar="LIST", help="Canary steps: nodes fully moved, e.g. 1,10%,100%.")
@click.option("--weights", metavar="LIST", help="Canary traffic shares, e.g. 5,25,100.")
@click.option("--bake", metavar="DUR", help="How long each wave bakes before its gates.")
@click.option("--mirror", metavar="P%", help="Shadow: share of requests mirrored.")
@click.option("--mirror-methods", metavar="LIST",
              help="Shadow: methods mirrored (default GET,HEAD; others have side effects).")
@click.option("--ignore-header", "ignore_headers", multiple=True, metavar="NAME",
              help="Shadow: a response header not compared (repeatable).")
@click.option("--ignore-json-field", "ignore_json_fields", multiple=True, metavar="PATH",
              help="Shadow: a JSON body field not compared, e.g. meta.time (repeatable, or a "
                   "comma-separated list).")
@click.option("--mirror-keep-header", "mirror_keep_headers", multiple=True, metavar="NAME",
              help="Shadow: send this request header to the shadow too (repeatable). By default "
                   "the copies go without the user's Cookie and Authorization headers: the "
                   "shadow must not act as the user. Keep one only if the release under test "
                   "needs it and may see users' credentials.")
@click.option("--then", metavar="STRATEGY", help="Shadow: promote with blue-green or rolling.")
@click.option("--scale-down-delay", metavar="DUR", help="Blue-green: keep the old slot warm.")
@click.option("--min-healthy", metavar="P%", help="Gate: share of the wave's nodes healthy.")
@click.option("--max-error-rate", metavar="X",
              help="Gate: new-slot error rate (0.01 or 1%). Under --analysis sequential: the "
                   "rise over the old slots' error rate that is tolerated.")
@click.option("--max-p99-ratio", metavar="X",
              help="Gate: p99 new / p99 old. Under --analysis sequential: a regression is more "
                   "than 1% of new requests slower than X times old's p99.")
@click.option("--max-mismatch-rate", metavar="X", help="Gate: shadow mismatch rate.")
@click.option("--min-requests", metavar="N",
              help="Gate: fewer requests is inconclusive (under --analysis sequential it holds a "
                   "pass, never a failure).")
@click.option("--analysis", metavar="threshold|sequential",
              help="How --max-error-rate and --max-p99-ratio judge: threshold (default) compares "
                   "the bake window's figures with them at its end; sequential weighs the "
                   "evidence (e-values) on every router report, fails the wave as soon as it "
                   "crosses 1/alpha, and passes at the bake's end only if the data rule the "
                   "regression out (else inconclusive: a longer bake or more traffic needed).")
@click.option("--alpha", metavar="X",
              help="Sequential: the probability of rolling back a release that does not "
                   "regress, and of passing one that does (default 0.01, or 1%).")
@click.option("--progress-deadline", metavar="DUR", help="Time for a wave's nodes to converge.")
@click.option("--on-failure", metavar="rollback|pause", help="What a failed gate does.")
@click.option("--on-node-lost", metavar="fail|wait",
              help="A target node going offline (no heartbeats) while its wave updates or bakes: "
                   "fail (default) fails it at once, naming it, and --on-failure follows; wait "
                   "holds the wave for it (it counts against --max-unavailable) until it is back "
                   "and converged, or fails it at the --progress-deadline (for a bake: that long "
                   "after the bake's end).")
@click.option("--cohort-key", metavar="header:NAME|cookie:NAME|ip",
              help="Canary by users: --weights become shares of users, told apart by this key; "
                   "one user sees one version on every node, and only moves old -> new.")
@click.option("--cohort-fallback", metavar="ip|request", help="Cohorts: what decides without "
              "the key: the client IP (default; still sticky) or the per-request split.")
@click.option("--assign-cookie", is_flag=True, default=None,
              help="Cohorts (cookie key): the router gives a browser without the cookie a random "
                   "one (HttpOnly, SameSite=Lax, Path=/, 30 days), so anonymous users stick too.")
@click.option("--allow", "allow", multiple=True, metavar="header:NAME=VALUE|cookie:NAME=VALUE",
              help="Canary: matching requests always get the new version (repeatable); with "
                   "--weights 0,... only they see it first.")
@click.option("--deny", "deny", multiple=True, metavar="header:NAME=VALUE|cookie:NAME=VALUE",
              help="Canary: matching requests stay on the old version (repeatable; wins).")
@click.option("--preview", "preview", multiple=True, metavar="header:NAME=VALUE", help="Blue-"
              "green staging, shadow: matching requests reach the staged release (repeatable).")
@click.option("--prestage", metavar="N|all",
              help="Rolling (and canary steps): start and health-check the new release on the "
                   "nodes of the next N waves (all: every later wave) at weight 0, serving "
                   "nothing, while the current wave switches and bakes; each wave is then a "
                   "router switch plus its bake. A staging failure is handled before its wave "
                   "as a failed update (--on-failure). Default 1 for rolling, 0 for canary; "
                   "0 turns it off. No meaning for blue-green, shadow or remove.")
@click.option("--detach", is_flag=True, help="Print the rollout id and return at once.")
@click.option("--wait", type=click.Choice(WAITS), default=None,
              help="How far to follow: done (the rollout ended or waits for an operator), "
                   "switched (every node serves the new release; then print how to roll back "
                   "while the old slots are warm) or started (the first wave is moving). Exit 0 "
                   "at that point. Default: switched for blue-green, done for the others.")
@output_option
@click.pass_obj
def deploy(ctx: Ctx, /, service: str | None, version: str | None, file: Path | None,
           detach: bool, wait: str | None, output: str, **flags: Any) -> int:
    """Roll SERVICE out to VERSION across the fleet, and follow it until it ends (or --wait).

    \b
    Exit codes: 0 succeeded (or the --wait point passed; --detach: started), 1 aborted or an
    error, 2 usage, 3 rolled back, 4 paused or failed (an operator must act), 5 the rollout was
    recorded but its start is not confirmed (--detach only; a bus error while starting it: the
    coordinator starts it on its next resync; check with 'fleetwave status ID'). Followed, such
    a rollout is followed as any other. It ends as its record does: "succeeded" once every
    node serves VERSION; the old slots' retirement is written just after, and the
    rollout.succeeded event is published once those writes are acknowledged."""
    settings: dict[str, Any] = read_rollout_file(file) if file is not None else {}
    if service is not None:
        settings["service"] = service
    if version is not None:
        settings["version"] = version
    for key in _FLAGS:
        value = flags.get(key)
        if value is not None and value != ():
            settings[key] = list(value) if isinstance(value, tuple) else value
    spec = build_spec(settings)
    return start(ctx, spec, wait=wait_point(spec, wait, detach=detach), detach=detach,
                 output=output)


def start(ctx: Ctx, spec: RolloutSpec, *, wait: str, detach: bool, output: str) -> int:
    """Send ``spec`` to the coordinator, then print its id (``detach``) or follow it to
    ``wait``; the exit code (``deploy``'s, which ``remove`` shares)."""
    return asyncio.run(deploy_and_follow(ctx, spec, wait=wait, detach=detach, output=output))


async def deploy_and_follow(ctx: Ctx, spec: RolloutSpec, *, wait: str, detach: bool,
                            output: str) -> int:
    """``start`` in the event loop."""
    # One connection for the request and the following (a second one cost a connect, a TLS
    # handshake on a secure bus, before the first status), subscribed to the rollouts' events
    # before the request, so that none of its first events can pass unheard.
    moved = asyncio.Event()  # an event of this rollout was heard: read its status now
    rid = ""

    async def heard(subject: str, data: bytes) -> None:
        if not rid or rid.encode() in data:
            moved.set()

    async with client.connected(ctx) as bus:
        if not detach:
            for kind in ENDING_KINDS if (output, wait) == ("json", "done") else FOLLOWED_KINDS:
                with contextlib.suppress(BusError):  # without them, polling alone still follows
                    await bus.subscribe(subjects.event(ctx.fleet, kind), heard)
        try:
            data = await client.call(ctx, "deploy", DeployRequest(spec=spec), timeout=30.0,
                                     bus=bus)
            started = True
        except RemoteError as exc:
            if exc.code != "accepted" or not isinstance(exc.data, dict) or "id" not in exc.data:
                raise
            click.echo(safe(f"fleetwave: {exc}"), err=True)
            data, started = exc.data, False
        rid = str(data["id"])
        if detach:
            click.echo(json.dumps({"id": rid}) if output == "json" else rid)
            return 0 if started else EXIT_ACCEPTED
        if output != "json":
            click.echo(f"rollout {rid} {'started' if started else 'recorded'}; following it "
                       "(Ctrl-C stops following, not the rollout)", err=True)
        # Poll the rollout's status until it ends or waits for an operator, or passes ``wait``
        # first (then exit 0, saying what is true and what to do).
        return await _follow(ctx, bus, rid, output=output, wait=wait, moved=moved,
                             scale_down_delay=spec.scale_down_delay)


def _live() -> Live:
    """The view a followed rollout redraws on a terminal (rich, imported only for it)."""
    from rich.console import Console
    from rich.live import Live

    return Live(console=Console(), refresh_per_second=4, transient=False)


async def _follow(ctx: Ctx, bus: Any, rid: str, *, output: str, wait: str,
                  moved: asyncio.Event, scale_down_delay: float) -> int:
    base.followed[:] = [rid]
    tty = output != "json" and sys.stdout.isatty()
    last: dict[str, Any] | None = None
    said: dict[str, Any] = {}  # every node row the plain output has gone by
    silent_since: float | None = None
    live = _live() if tty else None
    try:
        if live is not None:
            live.start()
        while True:
            moved.clear()
            try:
                st = await client.call(ctx, "status",
                                       RolloutRequest(id=rid, max_nodes=FOLLOW_NODES), bus=bus)
                silent_since = None
            except NotReachable as exc:
                now = time.monotonic()
                silent_since = silent_since or now
                if now - silent_since > FOLLOW_PATIENCE:
                    raise NotReachable(f"{exc} (lost rollout {rid} for {FOLLOW_PATIENCE:g}s; "
                                       f"check later with 'fleetwave status {rid}')") from None
                await asyncio.sleep(POLL)
                continue
            if live is not None:
                live.update(status_renderable(st))
            elif output != "json":
                # Against every node row seen so far, not the last poll's alone: a brief status
                # (more nodes than FOLLOW_NODES) shows a node while it is in motion only, and
                # one that comes back into it must not be said twice.
                before = None if last is None else {**last, "nodes": said}
                for line in progress_lines(before, st):
                    click.echo(line)
                said.update(st.get("nodes") or {})
            last = st
            state = st.get("state", "")
            if state in EXIT_CODES or reached(wait, st):
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL):
                    await moved.wait()
    finally:
        if live is not None:
            live.stop()
    if output == "json" and last is not None and brief(last):
        # What -o json prints has every node, as ever: the rows and waves of a full read; the
        # state, and so the exit code, of the poll the follow stopped on.
        with contextlib.suppress(NotReachable):
            full = await client.call(ctx, "status", RolloutRequest(id=rid), bus=bus)
            last = {**last, "nodes": full.get("nodes", {}), "waves": full.get("waves", [])}
    if last is not None and reached(wait, last):
        if output == "json":
            click.echo(json.dumps(last, indent=2, sort_keys=True))
        else:
            for line in reached_lines(wait, last, scale_down_delay):
                click.echo(safe(line))
        return 0
    if output == "json":
        click.echo(json.dumps(last, indent=2, sort_keys=True))
        return EXIT_CODES[str(last["state"])] if last else 1
    if last is not None and live is None:
        for line in shadow_report_lines(last.get("report") or {}):
            click.echo(line)  # on a terminal the Live view already shows it
    if last is not None and last.get("reason"):
        click.echo(safe(f"rollout {rid} {last['state'].replace('_', ' ')}: {last['reason']}"),
                   err=True)
    return EXIT_CODES[str(last["state"])] if last else 1


# -- reading ---------------------------------------------------------------------------------------


def _rollout_id(_: click.Context, param: click.Parameter, value: str | None) -> str:
    """A ROLLOUT (or --rollout) as given; "" when left out. An empty one given (``RID=""; abort
    "$RID"``) is refused: the coordinator reads "" as the latest rollout of any service, and a
    script's empty variable must not pause, abort or show that one."""
    if value is None:
        return ""
    if not value.strip():
        raise click.BadParameter(
            "is empty; pass a rollout's id, as 'fleetwave rollouts' lists them", param=param)
    return value


rollout_argument = click.argument("rollout", callback=_rollout_id)


@cli.command()
@click.argument("rollout", required=False, default=None, callback=_rollout_id)
@output_option
@click.pass_obj
def status(ctx: Ctx, rollout: str, output: str) -> None:
    """Show one rollout (the latest without ROLLOUT): waves, gate figures, nodes."""
    st = client.request(ctx, "status", RolloutRequest(id=rollout))
    if output == "json":
        click.echo(json.dumps(st, indent=2, sort_keys=True))
    else:
        if sys.stdout.isatty():
            from rich.console import Console  # (not for -o json: render.py says why)

            Console().print(status_renderable(st))
        else:
            click.echo(status_text(st))
        if line := client.leader_line(ctx):
            click.echo(line)


@cli.command()
@click.option("--service", default="", help="Only rollouts of this service.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="At most this many rows; each service's index holds its last 100 rollouts "
              "(or the coordinator's --keep-rollouts, if more): 'fleetwave status ID' reads "
              "an older one.")
@output_option
@click.pass_obj
def rollouts(ctx: Ctx, service: str, limit: int, output: str) -> None:
    """List rollouts, newest first."""
    rows = client.request(ctx, "rollouts", ListRolloutsRequest(service=service, limit=limit))
    if output == "json":
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        click.echo("no rollouts yet; start one with 'fleetwave deploy SERVICE VERSION'")
    else:
        from rich.console import Console

        Console(soft_wrap=True).print(rollouts_table(rows))


@cli.command()
@click.option("--follow", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
@click.option("--rollout", default=None, callback=_rollout_id, metavar="ID",
              help="Only events of this rollout.")
@click.option("--last", type=click.IntRange(1), default=None, help="Only the last N events.")
@output_option
@click.pass_obj
def events(ctx: Ctx, follow: bool, rollout: str, last: int | None, output: str) -> None:
    """Print the fleet's events (the audit log), oldest first.

    -o json prints JSON Lines: one event per line, each a JSON object (not one JSON
    document: read it line by line, e.g. with 'jq -c .' or json.loads per line).

    Each event the coordinator records says who caused it (``who`` in -o json; "(by NAME)" on
    a line): the operator whose request it answers, named by their --creds; "coordinator" for
    what it decided by itself; "unknown" for a request of an older CLI on an open bus. On an
    open bus (no credentials) the name is the OS user the CLI gave, a claim nothing checks."""
    asyncio.run(_events(ctx, follow=follow, rollout=rollout, last=last, output=output))


async def _events(ctx: Ctx, *, follow: bool, rollout: str, last: int | None, output: str) -> None:
    def show(event: Event) -> None:
        if rollout and event.rollout != rollout:
            return
        if output == "json":
            click.echo(encode(event).decode())
        else:
            click.echo(event_line(event))

    # --last N: the stream's last N messages hold N events or more (a pack holds many): the
    # events they hold are kept until the last of them came, then the last N are shown.
    backlog: list[Event] | None = [] if last is not None else None

    def caught_up() -> None:
        nonlocal backlog
        if backlog is not None and last is not None:
            for event in backlog[-last:]:
                show(event)
        backlog = None

    name = subjects.events_stream(ctx.fleet)
    async with client.connected(ctx) as bus:
        stream = bus.stream_records(name, subjects.events(ctx.fleet), follow=follow, last=last,
                                    caught_up=caught_up)
        try:
            async for subject, data in stream:
                try:
                    events = received_all(ctx.fleet, subject, data)
                except ProtocolError as exc:
                    # junk, or a node's event naming another node: not the fleet's audit log
                    click.echo(safe(f"skipped a message on {subject}: {exc}"), err=True)
                    continue
                for event in events:
                    if backlog is not None:
                        backlog.append(event)
                    else:
                        show(event)
        except BusError as exc:
            if not _no_stream(exc, name):
                raise
            raise FleetwaveError(
                f"fleet {ctx.fleet!r} has no events yet (no events stream): check --fleet, or "
                "start a coordinator ('fleetwave coordinator')") from None
        caught_up()


def _no_stream(exc: BusError, stream: str) -> bool:
    """Whether ``exc`` says that ``stream`` does not exist: a wrong --fleet, or a broker where no
    coordinator ever ran (it makes the stream). ``Bus.stream_records`` names the stream and
    passes on the server's answer: JetStream's "stream not found" is error code 10059."""
    text = str(exc)
    return text.startswith(f"cannot read stream {stream}:") and (
        "err_code=10059" in text or "stream not found" in text)


# -- operator requests -----------------------------------------------------------------------------


# The state each request leaves a rollout in. Asked again after its answer was lost (a timeout,
# a script's retry), the coordinator refuses it as a conflict ("cannot pause rollout X: it is
# paused"; "rollout X is already aborted"): the CLI then says it is there already and exits 0,
# as ``cordon`` does for a cordoned node. What the rollout's status says decides, not the
# refusal's wording: a resume refused while it rolls back (state running, phase rollback) is
# no resume done.
REACHES = {"pause": "paused", "resume": "running", "abort": "aborted"}


def _operator(verb: str, done: str) -> None:
    @cli.command(name=verb, help=f"{done.capitalize()} a running rollout.")
    @rollout_argument
    @output_option
    @click.pass_obj
    def command(ctx: Ctx, rollout: str, output: str) -> None:
        try:
            st = client.request(ctx, verb, RolloutRequest(id=rollout))
        except RemoteError as exc:
            there = _already(ctx, verb, rollout, exc)
            if there is None:
                raise
            if output == "json":
                click.echo(json.dumps(there, indent=2, sort_keys=True))
            else:
                click.echo(safe(f"rollout {rollout}: {REACHES[verb]} (already)"))
            return
        _said(st, output)

    del command


def _already(ctx: Ctx, verb: str, rollout: str, refused: RemoteError) -> dict[str, Any] | None:
    """The status of ``rollout`` when the coordinator refused ``verb`` as a conflict because the
    rollout is already where ``verb`` takes it (None otherwise, or if its status cannot be
    read: then the refusal stands)."""
    if refused.code != "conflict" or verb not in REACHES:
        return None
    try:
        st = client.request(ctx, "status", RolloutRequest(id=rollout))
    except (RemoteError, BusError, ProtocolError):
        return None
    if not isinstance(st, dict) or st.get("id") != rollout or st.get("state") != REACHES[verb]:
        return None
    if verb == "resume" and st.get("phase") == "rollback":
        return None
    return st


def _said(st: dict[str, Any], output: str) -> None:
    if output == "json":
        click.echo(json.dumps(st, indent=2, sort_keys=True))
    else:
        state = str(st["state"]).replace("_", " ")
        click.echo(safe(f"rollout {st['id']}: {state}"
                        + (f" ({st['reason']})" if st["reason"] else "")))


for _verb, _done in (("pause", "pause"), ("resume", "resume"), ("abort", "abort")):
    _operator(_verb, _done)


@cli.command()
@rollout_argument
@click.option("--full", is_flag=True, help="Skip every remaining bake and gate, not just this one.")
@output_option
@click.pass_obj
def promote(ctx: Ctx, rollout: str, full: bool, output: str) -> None:
    """Skip the current wave's bake and gates (--full: of every remaining wave)."""
    _said(client.request(ctx, "promote", RolloutRequest(id=rollout, full=full)), output)


@cli.command()
@click.argument("service")
@click.option("--to", "to_version", default="", metavar="VERSION",
              help="Deploy this version instead of the one before the last rollout.")
@output_option
@click.pass_obj
def rollback(ctx: Ctx, service: str, to_version: str, output: str) -> None:
    """Roll SERVICE back: its running rollout, or to the version it ran before."""
    data = client.request(ctx, "rollback", RollbackRequest(service=service, to_version=to_version),
                          timeout=30.0)
    if output == "json":
        click.echo(json.dumps(data, sort_keys=True))
    else:
        click.echo(f"rollout {data['id']}: {data['action']}; follow it with 'fleetwave status "
                   f"{data['id']}'")

