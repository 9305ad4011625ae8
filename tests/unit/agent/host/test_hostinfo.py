"""hostinfo.trim_heap: glibc's malloc_trim where there is one, nothing elsewhere."""

from __future__ import annotations

import os

import pytest

from agent.host import hostinfo


@pytest.fixture(autouse=True)
def _fresh_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostinfo, "_trim_checked", False)
    monkeypatch.setattr(hostinfo, "_malloc_trim", None)


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


def test_trims_exactly_on_glibc() -> None:
    """The trim runs where the libc is glibc and nowhere else, on every call."""
    garbage = [bytes(100) for _ in range(100_000)]
    del garbage
    assert hostinfo.trim_heap() is _glibc()
    assert hostinfo.trim_heap() is _glibc()


def test_does_nothing_on_another_libc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the libc is not glibc (confstr knows no such name), nothing is called."""

    def no_such_name(name: str) -> str:
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", no_such_name)
    assert hostinfo.trim_heap() is False


def test_does_nothing_when_the_symbol_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libc that claims glibc but has no malloc_trim symbol is no error either."""
    import ctypes

    class NoTrim:
        def __init__(self, name: object) -> None:
            pass

        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.99")
    monkeypatch.setattr(ctypes, "CDLL", NoTrim)
    assert hostinfo.trim_heap() is False
