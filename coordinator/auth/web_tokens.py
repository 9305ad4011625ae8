"""Operator tokens of the web dashboard: a file of names and hashes, and the check of a token.

Theory of operation: ``fleetwave auth add-web-token DIR NAME`` makes a random token
(``fwt_`` + 32 random bytes, URL-safe base64), prints it once, and keeps only its SHA-256 in
``DIR/web-tokens.json`` (0600, written atomically). The coordinator reads that file with
``--http-tokens FILE`` (``TokenFile``) and checks the ``Authorization: Bearer`` header of every
dashboard action against it (``verify``). The name is who the action is recorded as: the caller
of the API request the coordinator sends on the bus for it, so it lands in the audit log as
any CLI request does.

**Bound to an auth directory.** A token's name is an operator's, and an operator revoked with
``fleetwave auth revoke`` (or whose credentials expired) must not act through the dashboard
either. So a token file is *bound* to the fleet's auth directory (``coordinator.auth.enroll``)
when it lies in it (``AUTH/web-tokens.json``: ``add-web-token AUTH NAME``) or names it
(``add-web-token DIR NAME --auth-dir AUTH`` records AUTH in the file). Then ``add`` takes only
the name of an enrolled operator whose credentials have not expired, and the coordinator
refuses a token whose name is not one now (``Operators``: ``AUTH/auth.json``, re-read when it
changes), so a revocation or an expiry holds from the next request without a restart, wherever
the token file is; ``auth revoke`` also removes the operator's token from ``AUTH``'s own token
file. A file bound to nothing (made apart, without ``--auth-dir``) is checked against no one:
only ``revoke-web-token`` ends its tokens. The coordinator must be able to read a bound auth
directory: one it cannot read refuses every token (at start: one line, exit 2).

Why a plain SHA-256 and no salt or slow hash: the tokens are 256 random bits, not passwords;
nothing can be guessed from the digest, and a slow hash would only slow every request down.
Every digest is compared in constant time (``hmac.compare_digest``), and all of them each time,
so the timing says nothing about which entry nearly matched.

The file (``auth_dir`` only when bound by ``--auth-dir``; an older fleetwave refuses a file
that has it)::

    {"version": 1, "auth_dir": "/etc/fleetwave/auth",
     "tokens": [{"name": "alice", "sha256": "<64 hex>", "created": 1.7e9, "key": "U..."}]}

(``expires`` when the token has one; ``key``, the operator's public nkey when the token was
made, in a bound file: a token is refused once its operator holds another key, enrolled again
under the same name or renewed with ``--new-key``. An older fleetwave refuses a file with it.)

A name is a caller token (``protocol.subjects.check_name``), never one of the coordinator's own
("coordinator", "unknown"), and at most once in a file. ``TokenFile`` re-reads the file when it
changes (its size, mtime or inode), so a revocation takes effect at the next request without a
restart. A file that cannot be read or does not parse is one line at startup (exit 2); if it
turns bad while the coordinator runs, every token is refused until it is fixed (failing closed:
the bad write may have been a revocation).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from coordinator.auth.enroll import META, AuthDir, Identity
from coordinator.auth.enroll import _write as write_private  # atomic, 0600 from the start
from coordinator.errors import UsageError
from protocol import subjects
from protocol.creds import format_time
from protocol.errors import ProtocolError

log = logging.getLogger("fleetwave.coordinator.http")

FILE_NAME = "web-tokens.json"
LOCK_NAME = ".web-tokens.lock"  # held (flock) by add and revoke around read and rewrite
PREFIX = "fwt_"
MAX_TOKEN = 256  # a longer Authorization value is no token of ours; refused before hashing


class WebToken(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    name: str
    sha256: str
    created: float
    expires: float | None = None
    # The operator's nkey (public) when the token was made, in a bound file: a name revoked
    # and enrolled again (a new key) does not bring its old tokens back. None: made before
    # this, or in a file bound to nothing (checked by name alone).
    key: str | None = None


class TokenDoc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = 1
    auth_dir: str | None = None  # the auth directory the file is bound to (absolute), if named
    tokens: list[WebToken] = []


@dataclass(frozen=True)
class Verdict:
    """Who a presented token names (``name``), or why it is refused (``refusal``)."""

    name: str = ""
    refusal: str = ""
    key: str | None = None  # the operator key the token was made for, if it says


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


def parse_doc(data: bytes, where: str) -> TokenDoc:
    """A token file's bytes; UsageError naming ``where`` and what is wrong."""
    try:
        doc = msgspec.json.decode(data, type=TokenDoc)
    except msgspec.DecodeError as exc:
        raise UsageError(f"{where} is not a web token file ({exc}); make it with 'fleetwave "
                         "auth add-web-token DIR NAME'") from None
    if doc.version != 1:
        raise UsageError(f"{where} has version {doc.version}; this fleetwave reads version 1")
    if doc.auth_dir is not None and not Path(doc.auth_dir).is_absolute():
        raise UsageError(f"{where}: its auth_dir {doc.auth_dir!r} is not an absolute path")
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
    return doc


def parse(data: bytes, where: str) -> list[WebToken]:
    """The tokens of a file's bytes; UsageError naming ``where`` and what is wrong."""
    return parse_doc(data, where).tokens


def operator(users: list[Identity], name: str) -> Identity | None:
    """The operator ``name`` among ``users``, if enrolled."""
    return next((u for u in users if u.role == "operator" and u.name == name), None)


def not_operator(users: list[Identity], name: str, now: float, key: str | None = None) -> str:
    """Why ``name`` may not act as an operator of an auth directory whose identities are
    ``users`` ("" when it may: enrolled as an operator, its credentials not expired, and, for
    a token that names the ``key`` it was made for, still holding that key)."""
    who = operator(users, name)
    if who is None:
        return f"{name!r} is not an enrolled operator (revoked, or never enrolled)"
    if who.expires is not None and not who.live(dt.datetime.fromtimestamp(now, dt.UTC)):
        return f"operator {name!r}'s credentials expired at {format_time(who.expires)}"
    if key is not None and who.nkey != key:
        return (f"operator {name!r} has a new key since the token was made (enrolled again, or "
                "renewed with --new-key); make a new token")
    return ""


def bound_to(path: Path, doc: TokenDoc) -> Path | None:
    """The auth directory the token file ``path`` is bound to: the one it names, else its own
    directory when that is an auth directory; None (checked against no one) otherwise."""
    if doc.auth_dir is not None:
        return Path(doc.auth_dir)
    return path.parent if (path.parent / META).is_file() else None


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
    return Verdict(name=match.name, key=match.key)


# -- the file ----------------------------------------------------------------------------------


def read_doc(path: Path) -> TokenDoc:
    """The file ``path``; UsageError (one line) if unreadable or malformed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--http-tokens {path}: cannot read it ({exc.strerror or exc}); "
                         "make it with 'fleetwave auth add-web-token DIR NAME'") from None
    return parse_doc(data, f"--http-tokens {path}")


def read(path: Path) -> list[WebToken]:
    """The tokens of ``path``; UsageError (one line) if unreadable or malformed."""
    return read_doc(path).tokens


def add(directory: Path, name: str, expires: float | None, now: float,
        auth_dir: Path | None = None) -> tuple[str, Path]:
    """Make a token for ``name`` in ``directory``'s token file; the token (shown once) and the
    file's path. With ``auth_dir`` (or when the file is bound already: see the module
    docstring) ``name`` must be a live operator of that auth directory; ``auth_dir`` binds the
    file to it. Every refusal comes before anything is made."""
    check_name(name)
    path = directory / FILE_NAME
    _admit(directory, _existing(path), name, auth_dir, now)
    _make(directory)  # only add makes the directory (and the file)
    with _locked(directory):
        doc = _existing(path)
        bound = _admit(directory, doc, name, auth_dir, now)  # again: it may have changed
        token = new_token()
        who = operator(AuthDir(bound).load()[2], name) if bound is not None else None
        doc.tokens.append(WebToken(name=name, sha256=digest(token), created=now,
                                   expires=expires, key=who.nkey if who else None))
        doc.auth_dir = str(bound) if bound is not None and bound != directory.resolve() else None
        _save(directory, path, doc)
    return token, path


def _admit(directory: Path, doc: TokenDoc, name: str, auth_dir: Path | None,
           now: float) -> Path | None:
    """UsageError unless ``name`` may get a token in ``doc``, the file of ``directory``; the
    auth directory the file is to be bound to (resolved), or None."""
    path = directory / FILE_NAME
    if any(t.name == name for t in doc.tokens):
        raise UsageError(f"{path} already has a token named {name!r}; revoke it first with "
                         f"'fleetwave auth revoke-web-token {directory} {name}'")
    held = bound_to(path, doc)
    held = held.resolve() if held is not None else None
    wanted = auth_dir.resolve() if auth_dir is not None else held
    if held is not None and wanted != held:
        raise UsageError(f"{path} is bound to the auth directory {held}, not {auth_dir}; pass "
                         f"--auth-dir {held} (or none), or use another DIR for another fleet")
    if wanted is None:
        return None
    _, _, users = AuthDir(wanted).load()  # a missing or damaged one: its one line
    if why := not_operator(users, name, now):
        raise UsageError(f"no token for {name!r}: {why} in {wanted}; a dashboard token is an "
                         f"operator's (enroll with 'fleetwave auth add-operator {wanted} "
                         f"{name}', or renew)")
    if held is None:  # binding it now: a token it holds would be refused from then on
        strays = [t.name for t in doc.tokens if not_operator(users, t.name, now)]
        if strays:
            raise UsageError(f"{path} holds tokens of {', '.join(strays)}, no live operators "
                             f"of {wanted}: bound to it, the coordinator would refuse them; "
                             f"revoke them first ('fleetwave auth revoke-web-token {directory} "
                             "NAME')")
    return wanted


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
        doc = _existing(path)
        kept = [t for t in doc.tokens if t.name != name]
        if len(kept) == len(doc.tokens):
            raise UsageError(f"{path} has no token named {name!r}; its names: "
                             f"{', '.join(t.name for t in doc.tokens) or 'none'}")
        doc.tokens = kept
        _save(directory, path, doc)
    return path


def forget(auth_dir: Path, name: str) -> Path | None:
    """Remove operator ``name``'s token from the token file in the auth directory
    ``auth_dir`` (``fleetwave auth revoke``); its path, or None when it held none (or there is
    no such file: nothing is made)."""
    path = auth_dir / FILE_NAME
    if not path.is_file():
        return None
    with _locked(auth_dir):
        doc = _existing(path)
        kept = [t for t in doc.tokens if t.name != name]
        if len(kept) == len(doc.tokens):
            return None
        doc.tokens = kept
        _save(auth_dir, path, doc)
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


def _existing(path: Path) -> TokenDoc:
    if not path.exists():
        return TokenDoc()
    try:
        return parse_doc(path.read_bytes(), str(path))
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror or exc})") from None


def _make(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot make {directory} ({exc.strerror or exc})") from None


def _save(directory: Path, path: Path, doc: TokenDoc) -> None:
    # auth_dir only when there is one: a file bound to nothing stays readable by an older
    # fleetwave (its TokenDoc forbids unknown fields).
    out = msgspec.to_builtins(doc)
    if doc.auth_dir is None:
        del out["auth_dir"]
    _make(directory)
    write_private(path, msgspec.json.format(msgspec.json.encode(out)))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Operators:
    """The coordinator's view of the operators of the auth directory a token file is bound
    to: ``AUTH/auth.json``, re-read whenever it changes (``auth revoke`` rewrites it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp = _stamp(directory / META)
        try:
            self._users = AuthDir(directory).load()[2]  # at startup: one line, exit 2
        except UsageError as exc:
            raise UsageError(f"--http-tokens: its tokens are checked against the auth "
                             f"directory {directory}: {exc}") from None
        self._broken = ""

    def refusal(self, name: str, now: float, key: str | None = None) -> str:
        """Why the token of ``name`` (made for operator ``key``, if it says) may not act now
        ("" when it may)."""
        stamp = _stamp(self.directory / META)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._users, self._broken = AuthDir(self.directory).load()[2], ""
                log.info("http: re-read %s (%d operators)", self.directory / META,
                         sum(u.role == "operator" for u in self._users))
            except UsageError as exc:
                self._users, self._broken = [], str(exc)
                log.error("http: %s; refusing every dashboard action until it is fixed", exc)
        if self._broken:
            return ("the coordinator cannot read the auth directory its token file is bound "
                    "to; no action is allowed until an operator fixes it (see the coordinator's "
                    "log)")
        if why := not_operator(self._users, name, now, key):
            return f"the operator token {name!r} is no longer valid: {why}"
        return ""


class TokenFile:
    """The coordinator's view of ``--http-tokens FILE``, re-read whenever the file changes,
    and of the operators of the auth directory it is bound to (if it is)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = _stamp(path)
        doc = read_doc(path)  # at startup: a bad file is one line, exit 2
        self._tokens = doc.tokens
        bound = bound_to(path, doc)
        self._operators = Operators(bound) if bound is not None else None
        self._broken = ""

    def current(self) -> tuple[list[WebToken], str]:
        """The tokens now, and why none is accepted ("" when the file reads well)."""
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                doc = read_doc(self.path)
                self._bind(bound_to(self.path, doc))
                self._tokens, self._broken = doc.tokens, ""
                log.info("http: re-read %s (%d tokens)", self.path, len(self._tokens))
            except UsageError as exc:
                self._tokens, self._broken = [], str(exc)
                log.error("http: %s; refusing every dashboard action until it is fixed", exc)
        return self._tokens, self._broken

    def _bind(self, bound: Path | None) -> None:
        if bound is None:
            self._operators = None
        elif self._operators is None or self._operators.directory != bound:
            self._operators = Operators(bound)

    def verify(self, presented: str, now: float) -> Verdict:
        tokens, broken = self.current()
        if broken and presented:
            return Verdict(refusal="the coordinator cannot read its token file; no action is "
                           "allowed until an operator fixes it (see the coordinator's log)")
        verdict = verify(tokens, presented, now)
        if verdict.refusal or self._operators is None:
            return verdict
        why = self._operators.refusal(verdict.name, now, verdict.key)
        return Verdict(refusal=why) if why else verdict
