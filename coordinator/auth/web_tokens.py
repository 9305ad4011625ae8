"""Operator tokens of the web dashboard: a file of names and hashes, and the check of a token.

Theory of operation: ``fleetwave auth add-web-token DIR NAME`` makes a random token
(``fwt_`` + 32 random bytes, URL-safe base64), prints it once, and keeps only its SHA-256 in
``DIR/web-tokens.json`` (0600, written atomically). The coordinator reads that file with
``--http-tokens FILE`` (``TokenFile``) and checks the ``Authorization: Bearer`` header of every
dashboard action against it (``verify``). The name is who the action is recorded as: the caller
of the API request the coordinator sends on the bus for it, so it lands in the audit log as
any CLI request does.

Why a plain SHA-256 and no salt or slow hash: the tokens are 256 random bits, not passwords;
nothing can be guessed from the digest, and a slow hash would only slow every request down.
Every digest is compared in constant time (``hmac.compare_digest``), and all of them each time,
so the timing says nothing about which entry nearly matched.

The file::

    {"version": 1, "tokens": [{"name": "alice", "sha256": "<64 hex>", "created": 1.7e9,
                               "expires": null}]}

A name is a caller token (``protocol.subjects.check_name``), never one of the coordinator's own
("coordinator", "unknown"), and at most once in a file. ``TokenFile`` re-reads the file when it
changes (its size, mtime or inode), so a revocation takes effect at the next request without a
restart. A file that cannot be read or does not parse is one line at startup (exit 2); if it
turns bad while the coordinator runs, every token is refused until it is fixed (failing closed:
the bad write may have been a revocation).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from coordinator.auth.enroll import _write as write_private  # atomic, 0600 from the start
from coordinator.errors import UsageError
from protocol import subjects
from protocol.errors import ProtocolError

log = logging.getLogger("fleetwave.coordinator.http")

FILE_NAME = "web-tokens.json"
LOCK_NAME = ".web-tokens.lock"  # held (flock) by add and revoke around read and rewrite
PREFIX = "fwt_"
MAX_TOKEN = 256  # a longer Authorization value is no token of ours; refused before hashing


class WebToken(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    sha256: str
    created: float
    expires: float | None = None


class TokenDoc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = 1
    tokens: list[WebToken] = []


@dataclass(frozen=True)
class Verdict:
    """Who a presented token names (``name``), or why it is refused (``refusal``)."""

    name: str = ""
    refusal: str = ""


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    """A token's name: a caller as API subjects take it, not one the coordinator uses."""
    try:
        subjects.check_name("token name", name)
    except ProtocolError as exc:
        raise UsageError(str(exc)) from None
    if name in subjects.RESERVED_CALLERS:
        raise UsageError(f"token name {name!r} is the coordinator's own; choose another")
    return name


def parse(data: bytes, where: str) -> list[WebToken]:
    """The tokens of a file's bytes; UsageError naming ``where`` and what is wrong."""
    try:
        doc = msgspec.json.decode(data, type=TokenDoc)
    except msgspec.DecodeError as exc:
        raise UsageError(f"{where} is not a web token file ({exc}); make it with 'fleetwave "
                         "auth add-web-token DIR NAME'") from None
    if doc.version != 1:
        raise UsageError(f"{where} has version {doc.version}; this fleetwave reads version 1")
    seen: set[str] = set()
    for t in doc.tokens:
        try:
            check_name(t.name)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if t.name in seen:
            raise UsageError(f"{where}: token name {t.name!r} appears twice; keep one")
        seen.add(t.name)
        if len(t.sha256) != 64 or any(c not in "0123456789abcdef" for c in t.sha256):
            raise UsageError(f"{where}: the sha256 of token {t.name!r} is not 64 hex digits")
    return doc.tokens


def verify(tokens: list[WebToken], presented: str, now: float) -> Verdict:
    """Check a presented token against every entry (constant time each, all of them)."""
    if not presented:
        return Verdict(refusal="no operator token given: this dashboard is read-only without "
                       "one (enter it under 'Operator token')")
    if len(presented) > MAX_TOKEN:
        return Verdict(refusal="the operator token is not valid (too long)")
    if not presented.isascii():  # ours never are; a header's undecodable bytes are surrogates
        return Verdict(refusal="the operator token is not valid (not ASCII)")
    mine = digest(presented).encode()
    match: WebToken | None = None
    for t in tokens:
        if hmac.compare_digest(mine, t.sha256.encode()):
            match = t
    if match is None:
        return Verdict(refusal="the operator token is not valid (unknown or revoked); ask for "
                       "one made with 'fleetwave auth add-web-token'")
    if match.expires is not None and match.expires <= now:
        return Verdict(refusal=f"the operator token {match.name!r} has expired; ask for a new "
                       "one")
    return Verdict(name=match.name)


# -- the file ----------------------------------------------------------------------------------


def read(path: Path) -> list[WebToken]:
    """The tokens of ``path``; UsageError (one line) if unreadable or malformed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--http-tokens {path}: cannot read it ({exc.strerror or exc}); "
                         "make it with 'fleetwave auth add-web-token DIR NAME'") from None
    return parse(data, f"--http-tokens {path}")


def add(directory: Path, name: str, expires: float | None, now: float) -> tuple[str, Path]:
    """Make a token for ``name`` in ``directory``'s token file; the token (shown once) and the
    file's path."""
    check_name(name)
    path = directory / FILE_NAME
    _make(directory)  # only add makes the directory (and the file)
    with _locked(directory):
        tokens = _existing(path)
        if any(t.name == name for t in tokens):
            raise UsageError(f"{path} already has a token named {name!r}; revoke it first with "
                             f"'fleetwave auth revoke-web-token {directory} {name}'")
        token = new_token()
        tokens.append(WebToken(name=name, sha256=digest(token), created=now, expires=expires))
        _save(directory, path, tokens)
    return token, path


def revoke(directory: Path, name: str) -> Path:
    """Remove ``name``'s token from ``directory``'s token file; its path. A directory or a
    file that is not there is refused before anything is touched (a typo makes nothing)."""
    path = directory / FILE_NAME
    if not directory.is_dir():
        raise UsageError(f"{directory} is no directory of web tokens (it does not exist); pass "
                         "the DIR given to 'fleetwave auth add-web-token'")
    if not path.is_file():
        raise UsageError(f"{directory} holds no {FILE_NAME}: no token to revoke there; pass the "
                         "DIR given to 'fleetwave auth add-web-token'")
    with _locked(directory):
        tokens = _existing(path)
        kept = [t for t in tokens if t.name != name]
        if len(kept) == len(tokens):
            raise UsageError(f"{path} has no token named {name!r}; its names: "
                             f"{', '.join(t.name for t in tokens) or 'none'}")
        _save(directory, path, kept)
    return path


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One change of the token file at a time, across processes (each reads, then rewrites
    the whole file: two at once would lose one's token or revocation). ``directory`` must
    exist: the lock never makes it."""
    try:
        lock = (directory / LOCK_NAME).open("a")
    except OSError as exc:
        raise UsageError(f"cannot open {directory / LOCK_NAME} ({exc.strerror or exc})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _existing(path: Path) -> list[WebToken]:
    if not path.exists():
        return []
    try:
        return parse(path.read_bytes(), str(path))
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror or exc})") from None


def _make(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot make {directory} ({exc.strerror or exc})") from None


def _save(directory: Path, path: Path, tokens: list[WebToken]) -> None:
    _make(directory)
    write_private(path, msgspec.json.format(msgspec.json.encode(TokenDoc(tokens=tokens))))


class TokenFile:
    """The coordinator's view of ``--http-tokens FILE``, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._tokens = read(path)  # at startup: a bad file is one line, exit 2
        self._broken = ""

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> tuple[list[WebToken], str]:
        """The tokens now, and why none is accepted ("" when the file reads well)."""
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._tokens, self._broken = read(self.path), ""
                log.info("http: re-read %s (%d tokens)", self.path, len(self._tokens))
            except UsageError as exc:
                self._tokens, self._broken = [], str(exc)
                log.error("http: %s; refusing every dashboard action until it is fixed", exc)
        return self._tokens, self._broken

    def verify(self, presented: str, now: float) -> Verdict:
        tokens, broken = self.current()
        if broken and presented:
            return Verdict(refusal="the coordinator cannot read its token file; no action is "
                           "allowed until an operator fixes it (see the coordinator's log)")
        return verify(tokens, presented, now)
