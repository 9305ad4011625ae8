"""Cohorts: a canary's weight as a share of *users*, one rule every node shares (pure).

Theory of operation. A cohort rule names a *key* that tells users apart: a request header
(``header:X-User``), a cookie (``cookie:fw_cohort``) or the client address (``ip``). Each key
value falls into a *bucket* in ``0..BUCKETS-1``::

    bucket(salt, value) = blake2b-64(value, key=blake2b-256(salt)) mod 10000

with the rollout id as the salt. The function is the same on every node, so a user's bucket is the
same on every node and for every step of one rollout; a different rollout (another salt) picks
other users. A request goes to the new slot when ``bucket < share``, where ``share`` is the new
slot's weight as a fraction of the two slots' weights, in buckets (``share_of``). Since ``share``
only grows with the weight, a user under weight ``w`` is under every ``w' > w``: users only move
old → new as a canary advances (*monotone*), and at weight 0 (a rollback's weights) nobody is new.

Before the key: a request matching a ``deny`` rule stays on the old slot; one matching an
``allow`` or ``preview`` rule goes to the new (or staged) slot, whatever its weight. Deny wins
over allow (a customer kept off the canary stays off it). A request without the key *falls back*:
to its client address (``ip``, so it is still sticky per address) or to the router's weighted
per-request split (``request``).

Vocabulary: *key* ``kind:name`` (the name is lower-case for headers, as sent for cookies);
*rule* ``kind:NAME=VALUE``; *side* the answer ``NEW``, ``OLD`` or ``SPLIT`` (no opinion: the
weighted split decides); *how* why, for the router's counters (``HOW_*``).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from hashlib import blake2b

from protocol.messages import SLOTS, CohortSpec

BUCKETS = 10_000  # the share is kept to 0.01 %: weights are whole percentages
# RFC 9110 token: what a header name or a cookie name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
KINDS = ("header", "cookie", "ip")
RULE_KINDS = ("header", "cookie")

NEW, OLD, SPLIT = 1, 0, -1
HOW_KEY, HOW_FALLBACK, HOW_ALLOW, HOW_DENY, HOW_ASSIGN, HOW_NONE = (
    "key", "fallback", "allow", "deny", "assign", "none")


class CohortError(ValueError):
    """A key or rule that cannot be used; the message says what, why and what to write."""


def parse_key(text: str, flag: str = "--cohort-key") -> tuple[str, str]:
    """``header:NAME`` | ``cookie:NAME`` | ``ip`` as ``(kind, name)`` (header names lower-case)."""
    kind, sep, name = text.partition(":")
    if kind == "ip" and not sep:
        return "ip", ""
    if kind not in ("header", "cookie") or not sep:
        raise CohortError(f"{flag} {text!r} is not a cohort key: write header:NAME, cookie:NAME "
                          "or ip (e.g. header:X-User)")
    if not _TOKEN.fullmatch(name):
        what = "header name" if kind == "header" else "cookie name (an HTTP token)"
        example = "header:X-User" if kind == "header" else "cookie:fw_cohort"
        raise CohortError(f"{flag} {text!r}: {name!r} is not a {what}; write e.g. {example}")
    if kind == "header" and "_" in name:
        # The router drops such headers from every request, as nginx does (CGI and WSGI
        # servers read X_Forwarded_For as X-Forwarded-For): a rule on one would never match.
        raise CohortError(f"{flag} {text!r}: the router drops header names with '_' (as nginx "
                          f"does); name the header with '-', e.g. header:{name.replace('_', '-')}")
    return kind, name.lower() if kind == "header" else name


def parse_rule(text: str, flag: str = "--allow") -> tuple[str, str, str]:
    """``header:NAME=VALUE`` | ``cookie:NAME=VALUE`` as ``(kind, name, value)``."""
    key, eq, value = text.partition("=")
    if not eq:
        raise CohortError(f"{flag} {text!r} has no '='; write header:NAME=VALUE or "
                          "cookie:NAME=VALUE (e.g. header:X-Beta=1)")
    kind, name = parse_key(key, flag)
    if kind not in RULE_KINDS:
        raise CohortError(f"{flag} {text!r}: a rule matches a header or a cookie, not {kind}; "
                          "write header:NAME=VALUE or cookie:NAME=VALUE")
    if (not value or not value.isprintable() or not value.isascii() or value != value.strip()
            or ";" in value):
        # ASCII: the router matches header bytes (latin-1); a value it cannot encode broke its
        # configuration on every node instead of being refused here (found by a review).
        raise CohortError(f"{flag} {text!r}: the value must be non-empty printable ASCII "
                          "without ';' or surrounding spaces")
    return kind, name, value


def check(spec: CohortSpec) -> None:
    """Refuse a rule the router could not apply (CohortError saying why)."""
    if spec.key:
        parse_key(spec.key)
    for flag, rules in (("--allow", spec.allow), ("--deny", spec.deny),
                        ("--preview", spec.preview)):
        for rule in rules:
            parse_rule(rule, flag)
    if spec.new not in SLOTS:
        raise CohortError(f"cohort slot {spec.new!r} is not a slot ({', '.join(SLOTS)})")
    if spec.assign_cookie and not spec.key.startswith("cookie:"):
        raise CohortError("--assign-cookie needs a cookie key; add --cohort-key cookie:NAME")


def salt_key(salt: str) -> bytes:
    """The blake2b key a salt stands for (any length of salt, a fixed 32-byte key)."""
    return blake2b(salt.encode("utf-8"), digest_size=32).digest()


def bucket(salt: str | bytes, value: bytes) -> int:
    """The bucket of ``value`` under ``salt`` (a salt string, or ``salt_key`` of it)."""
    key = salt_key(salt) if isinstance(salt, str) else salt
    return int.from_bytes(blake2b(value, digest_size=8, key=key).digest(), "big") % BUCKETS


def share_of(new_weight: int, old_weight: int) -> int:
    """How many buckets go to the new slot: its weight over both, rounded down (0 if none)."""
    total = max(new_weight, 0) + max(old_weight, 0)
    return max(new_weight, 0) * BUCKETS // total if total > 0 else 0


Rule = tuple[bool, bytes, bytes]  # (is a header, name, value)


def _rules(texts: list[str], flag: str) -> tuple[Rule, ...]:
    out = []
    for text in texts:
        kind, name, value = parse_rule(text, flag)
        out.append((kind == "header", name.encode("latin-1"), value.encode("latin-1")))
    return tuple(out)


def cookie_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's Cookie headers, or None."""
    for hname, hvalue in headers:
        if len(hname) == 6 and hname.lower() == b"cookie":
            for part in hvalue.split(b";"):
                k, eq, v = part.partition(b"=")
                if eq and k.strip() == name:
                    return v.strip().strip(b'"')
    return None


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    n = len(name)
    for hname, hvalue in headers:
        if len(hname) == n and hname.lower() == name:
            return hvalue.strip()
    return None


class Cohort:
    """A ``CohortSpec`` compiled for the request path: ``choose`` is what the router asks."""

    __slots__ = ("allow", "assign_cookie", "by_ip", "deny", "fallback_ip", "is_cookie",
                 "key_name", "new", "salt")

    def __init__(self, spec: CohortSpec) -> None:
        check(spec)
        self.new = spec.new
        self.salt = salt_key(spec.salt)
        kind, name = parse_key(spec.key) if spec.key else ("", "")
        self.by_ip = kind == "ip"
        self.is_cookie = kind == "cookie"
        self.key_name = name.encode("latin-1") if kind in ("header", "cookie") else b""
        self.fallback_ip = spec.fallback == "ip"
        self.assign_cookie = spec.assign_cookie
        self.deny = _rules(spec.deny, "--deny")
        self.allow = _rules(spec.allow, "--allow") + _rules(spec.preview, "--preview")

    def key_of(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The request's key value (header or cookie), or None (ip keys have none here)."""
        if not self.key_name:
            return None
        if self.is_cookie:
            value = cookie_value(headers, self.key_name)
        else:
            value = header_value(headers, self.key_name)
        return value or None

    def choose(
        self, headers: list[tuple[bytes, bytes]], ip: str, share: int
    ) -> tuple[int, str, int]:
        """``(side, how, hash)`` for one request with ``share`` buckets on the new slot; ``hash``
        is the key's 64-bit hash (0 when no key decided), for the users sketch.

        ``how`` is ``HOW_ASSIGN`` when the cookie key is missing and ``assign_cookie`` is on: the
        caller makes a value, routes by ``side_of`` it and sets the cookie (the side returned
        then is the fallback's)."""
        if self.deny and _matches(self.deny, headers):
            return OLD, HOW_DENY, 0
        if self.allow and _matches(self.allow, headers):
            return NEW, HOW_ALLOW, 0
        if self.by_ip:
            h = self.hash_of(ip.encode("latin-1"))
            return (NEW if h % BUCKETS < share else OLD), HOW_KEY, h
        if not self.key_name:
            return SPLIT, HOW_NONE, 0
        value = self.key_of(headers)
        if value is not None:
            h = self.hash_of(value)
            return (NEW if h % BUCKETS < share else OLD), HOW_KEY, h
        how = HOW_ASSIGN if self.assign_cookie else HOW_FALLBACK
        if self.fallback_ip:
            h = self.hash_of(ip.encode("latin-1"))
            return (NEW if h % BUCKETS < share else OLD), how, h
        return SPLIT, how, 0

    def hash_of(self, value: bytes) -> int:
        """The salted 64-bit hash of a key value (its bucket is this modulo ``BUCKETS``)."""
        return int.from_bytes(blake2b(value, digest_size=8, key=self.salt).digest(), "big")

    def side_of(self, value: bytes, share: int) -> int:
        """NEW if ``value``'s bucket is under ``share``, else OLD."""
        return NEW if self.hash_of(value) % BUCKETS < share else OLD


def _matches(rules: tuple[Rule, ...], headers: list[tuple[bytes, bytes]]) -> bool:
    for is_header, name, value in rules:
        got = header_value(headers, name) if is_header else cookie_value(headers, name)
        if got == value:
            return True
    return False


SKETCH_K = 128  # KMV sketch size: distinct counts within about 1/sqrt(k-2) ≈ 9 %
HASH_SPACE = 1 << 64


def sketch_add(sketch: list[int], h: int, k: int = SKETCH_K) -> None:
    """Keep ``sketch`` (sorted ascending) the ``k`` smallest distinct hashes seen."""
    if len(sketch) >= k and h >= sketch[-1]:
        return
    i = bisect_left(sketch, h)
    if i < len(sketch) and sketch[i] == h:
        return
    sketch.insert(i, h)
    if len(sketch) > k:
        sketch.pop()


def merge_sketches(sketches: list[list[int]], k: int = SKETCH_K) -> list[int]:
    """One sketch of the union (the nodes' sketches of one rollout merge this way)."""
    return sorted(set().union(*sketches))[:k] if sketches else []


def estimate_users(sketch: list[int], k: int = SKETCH_K) -> int:
    """Approximate distinct users behind a KMV sketch: exact below ``k``, else (k-1)/kth."""
    if len(sketch) < k:
        return len(sketch)
    return round((k - 1) * HASH_SPACE / (sketch[k - 1] + 1))


def describe(spec: CohortSpec | None, weight: int | None = None) -> str:
    """For people: ``20 % of users (header X-User; no key: client IP)``, or the rules alone."""
    if spec is None:
        return ""
    parts = []
    if spec.key:
        kind, _, name = spec.key.partition(":")  # the name as the operator wrote it
        what = "client IP" if kind == "ip" else f"{kind} {name}"
        if kind == "ip":
            detail = what
        else:
            fb = "client IP" if spec.fallback == "ip" else "per request"
            detail = f"{what}; no key: {fb}" + ("; cookie assigned" if spec.assign_cookie else "")
        lead = f"{weight} % of users" if weight is not None else "users"
        parts.append(f"{lead} ({detail})")
    if spec.allow:
        parts.append("allow " + ", ".join(spec.allow))
    if spec.deny:
        parts.append("deny " + ", ".join(spec.deny))
    if spec.preview:
        parts.append("preview " + ", ".join(spec.preview))
    return "; ".join(parts)
