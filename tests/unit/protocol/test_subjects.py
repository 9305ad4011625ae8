"""API subjects name their caller: built and parsed by position, legacy ones read as "unknown",
and an unproven name (an OS user) made into a token that cannot pass for the coordinator."""

from __future__ import annotations

import pytest

from protocol import subjects
from protocol.errors import ProtocolError


@pytest.mark.parametrize("fleet", ["prod", "api", "coord"])
@pytest.mark.parametrize("caller", ["alice", "api", "coord", "-x_1"])
def test_a_built_subject_names_its_caller(fleet: str, caller: str) -> None:
    """What api and coordinator_api build, api_caller reads back, whatever the words."""
    assert subjects.api_caller(subjects.api(fleet, caller, "deploy")) == caller
    assert subjects.api_caller(subjects.coordinator_api(fleet, "c0ffee", caller,
                                                        "deploy")) == caller


def test_legacy_subjects_name_no_caller() -> None:
    """An older CLI's subjects (no caller token) read as the reserved "unknown"."""
    assert subjects.api_caller(subjects.legacy_api("prod", "deploy")) == "unknown"
    assert subjects.api_caller(subjects.legacy_coordinator_api("prod", "c0", "abort")) == "unknown"


@pytest.mark.parametrize("subject", [
    "fw.prod.evt.rollout.started", "fw.prod.api", "x.prod.api.alice.deploy",
    "fw.prod.api.a+b.deploy", "fw.prod.coord.c0.api.alice.deploy.more", "fw.prod.hb.node-1",
])
def test_anything_else_is_refused(subject: str) -> None:
    """Subjects of other shapes, or with a caller token no name can be, raise ProtocolError."""
    with pytest.raises(ProtocolError):
        subjects.api_caller(subject)


def test_the_endpoints_are_the_callers_wildcards() -> None:
    """What coordinators serve and what an operator may publish differ only in the caller."""
    assert subjects.api_endpoint("p", "deploy") == "fw.p.api.*.deploy"
    assert subjects.coordinator_endpoint("p", "c0", "abort") == "fw.p.coord.c0.api.*.abort"
    assert subjects.operator_api("p", "alice") == ("fw.p.api.alice.*",
                                                   "fw.p.coord.*.api.alice.*")


@pytest.mark.parametrize(("name", "token"), [
    ("alice", "alice"), ("Jean Dupont", "Jean-Dupont"), ("dom\\user.x", "dom-user-x"),
    ("_svc", "svc"), ("", "anonymous"), ("coordinator", "os-coordinator"),
    ("unknown", "os-unknown"), ("a" * 80, "a" * 64), ("ü*>", "-"),
])
def test_an_os_user_becomes_a_token(name: str, token: str) -> None:
    """Characters a token may not hold become '-', no leading '_', at most 64, and never a
    reserved caller; every result is a name check_name takes."""
    assert subjects.caller_token(name) == token
    assert subjects.check_name("caller", token) == token


@pytest.mark.parametrize("name", ["hello\n", "node-1\n", "a\nb"])
def test_a_name_with_a_newline_is_refused(name: str) -> None:
    """A regex's "$" matches before a final newline: "hello\\n" passed as a service, node or
    fleet name and broke the subjects built from it (found by a review)."""
    with pytest.raises(ProtocolError):
        subjects.check_name("service", name)
