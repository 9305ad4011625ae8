"""Hostile manifests and bundles, fuzzed with the strategies of ``tests.hostile``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings

from protocol.errors import ProtocolError
from protocol.manifest import parse_manifest
from tests import hostile
from tests.hostile import CI


@CI
@given(text=hostile.manifest_texts())
def test_a_manifest_parses_into_something_runnable_or_is_refused(text: str) -> None:
    """Any fleetwave.toml text gives a manifest an agent can act on (argv and env exec-able,
    a health path fit for a request line) or one ProtocolError."""
    hostile.check_manifest(text)


@settings(CI, max_examples=150)
@given(data=hostile.bundles())
def test_a_hostile_bundle_unpacks_safely_or_not_at_all(data: bytes) -> None:
    """A .tar.gz with hostile members unpacks to plain files, directories and in-tree links with
    normalised modes, or is refused with BundleError leaving nothing behind."""
    with tempfile.TemporaryDirectory() as work:
        hostile.check_bundle(data, Path(work))


# -- what the fuzzing found, kept as regression cases ---------------------------------------------

BASE = 'name = "hello"\nversion = "1.0.0"\nport = 8080\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # NUL in an argument or an env value: exec refuses it, so the slot could never start.
        (BASE + 'command = ["python3", "a\\u0000b"]\n', "command has an argument with a NUL"),
        (BASE + 'command = ["x"]\n[hooks]\npre_start = ["a\\u0000"]\n', "hooks.pre_start"),
        (BASE + 'command = ["x"]\n[health]\nexec = ["a\\u0000"]\n', "health.exec"),
        (BASE + 'command = ["x"]\nenv = { A = "b\\u0000c" }\n', "env.A has a NUL"),
        # An empty argument (the shrunk case: hooks.pre_start = [""]).
        ('name = "0"\nversion = "0"\ncommand = ["0"]\n[env]\n\n[hooks]\npre_start = [""]\n',
         "hooks.pre_start has an empty argument"),
        # A probe path that is not printable ASCII: the probe's request line is written as is
        # (a space or CR LF splits it, and a non-latin-1 character failed to encode).
        (BASE + 'command = ["x"]\n[health]\nhttp = "/\\ufffdhealthz"\n', "health.http"),
        (BASE + 'command = ["x"]\n[health]\nhttp = "/a b"\n', "health.http"),
        (BASE + 'command = ["x"]\n[health]\nhttp = "/a\\r\\nX-Injected: 1"\n', "health.http"),
    ],
)
def test_found_by_fuzzing_manifest(text: str, message: str) -> None:
    """Each manifest the fuzzer found accepted but unusable is refused with one clear line."""
    with pytest.raises(ProtocolError, match=message):
        parse_manifest(text)
    hostile.check_manifest(text)
