"""Signed desired states: a coordinator key signs, agents verify before acting.

Theory of operation. A coordinator holds an ed25519 key as an nkeys *seed* (``SA...``; the same
key format NATS uses for identities) in a file only its owner can read. ``sign`` encodes a
DesiredState and signs a canonical byte string that binds, length-prefixed so no two field lists
can ever encode alike: a domain tag, the envelope kind, fleet, node, service, generation and the
payload bytes. ``verify`` is what an agent calls before it acts; it refuses, with a ProtocolError
whose message says why (fit for an ``agent.refused`` event):

- a kind other than ``desired``;
- a key that is not in the agent's trusted set (``unknown key``);
- a signature that does not match (any changed byte of payload or envelope field);
- an envelope addressed to another fleet, node or service;
- a payload whose fleet/node/service/generation disagree with the envelope;
- a generation not newer than ``min_generation`` (a replay or a rollback to old state), except
  a *re-signature* of the state the agent runs: the same generation and the same payload bytes,
  signed by another trusted key (``resign``; how a rotated signing key takes over the states its
  predecessor signed without a new generation, so nothing moves on any node).

The release digests sit inside the payload, so they are covered by the signature too.

Batch signatures. ``sign_batch`` signs many states with one signature: each envelope's signed
bytes are a leaf of a Merkle tree (SHA-256; leaves and inner nodes hashed under different prefix
bytes, RFC 6962's defence against passing an inner node off as a leaf; a pair hashed in sorted
order, so a proof needs no left/right bits), the signature covers the root under its own domain
tag, and each envelope carries its leaf's path (``proof``: the sibling hashes, 32 bytes each).
An agent folds its envelope's leaf up the path and checks the signature over the root it gets:
changing any byte of any bound field changes the leaf, hence the root. Why: one ed25519
signature per state was the largest single cost of a 10,000-node rollout (the coordinator's
signing and, ten times over, every simulated node's verification); a batch of 500 costs one
signature and 500 hashes. Only agents that announce ``messages.FEATURE_BATCH`` at registration
are sent batch-signed states (an older agent would refuse them as forged); ``verify`` takes both
forms.
A verified root is remembered (``_verify_root``), so one process standing for many nodes (the
simulator) checks a batch's signature once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import os
import secrets
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import DesiredState, SignedEnvelope

DOMAIN = b"fleetwave-envelope-v1"
# An envelope with a lease term (> 0) binds the term too, under its own domain tag, so the bytes of
# a termed envelope can never equal those of an unfenced one.
DOMAIN_TERMED = b"fleetwave-envelope-v2"
# A batch signature covers a Merkle root under this tag (never the bytes of an envelope).
DOMAIN_BATCH = b"fleetwave-batch-v1"
KIND_DESIRED = "desired"
HASH_SIZE = 32  # SHA-256
MAX_PROOF = 40  # sibling hashes in a proof: a batch of 2**40 states has no longer path
_LEAF = b"\x00"
_INNER = b"\x01"
# Coordinator keys are "account" nkeys (seed "SA...", public key "A..."); the role byte is part
# of the key text, so a NATS user or server key pasted by mistake is recognisably different.
_PREFIX = nkeys.PREFIX_BYTE_ACCOUNT


def generate_seed() -> bytes:
    """Return a new random coordinator seed (nkeys text, ``SA...``)."""
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), _PREFIX)
    return seed


def public_key(seed: bytes) -> str:
    """Return the public key text (``A...``) of ``seed``; ProtocolError if it is not a seed."""
    return _keypair(seed)[1]


def store_seed(path: Path, seed: bytes) -> None:
    """Write ``seed`` to ``path`` atomically, readable by its owner only (0600)."""
    public_key(seed)  # refuse to store something that is not a seed
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(seed + b"\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(dfd)
    finally:
        os.close(dfd)


def load_seed(path: Path) -> bytes:
    """Read a seed file; refuse anything but a regular file owned by this user (or root), one
    that others can read, or one that holds no coordinator seed (SA...). A symbolic link is
    followed (keys are often managed so), and the checks hold for the file it names: opened,
    then ``fstat`` (a file another user placed in a shared directory, or linked to, is theirs
    to know)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot read the signing key: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"{path}: the signing key is not a regular file; pass a key "
                                "file with --key-file")
        if st.st_uid not in (os.geteuid(), 0):
            raise ProtocolError(
                f"{path}: signing key is owned by uid {st.st_uid}, not by this user "
                f"(uid {os.geteuid()}); anyone who owns it can replace the key: use a key file "
                "of your own"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ProtocolError(
                f"{path}: signing key is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run 'chmod 600 {path}'"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read()
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot read the signing key: {exc.strerror}") from None
    finally:
        os.close(fd)
    seed = text.strip()
    try:
        public_key(seed)
    except ProtocolError:
        raise ProtocolError(f"{path}: does not hold an nkeys seed (SA...)") from None
    if not seed.startswith(b"SA"):  # the key agents trust is an account key (generate_seed)
        kind = seed[:2].decode()
        raise ProtocolError(f"{path}: holds an nkeys seed of another kind ({kind}...), not a "
                            "coordinator signing key (SA...); remove it to have one made, or "
                            "restore the coordinator's key")
    return seed


def check_public_key(text: str) -> str:
    """Return ``text`` (stripped) if it is a coordinator public key (``A...``); else ProtocolError
    saying why, so that an agent refuses a mistyped ``--trust-key`` at start, not every state."""
    key = text.strip()
    if not key:
        raise ProtocolError("empty key; pass the public key the coordinator prints (A...)")
    if key.startswith("S"):
        raise ProtocolError("that is a seed (a secret), not a public key; pass the public key "
                            "the coordinator prints (A...)")
    try:
        _verify_key(key)
    except ProtocolError as exc:
        raise ProtocolError(str(exc).removeprefix("refused envelope: ")) from None
    return key


def signed_bytes(env: SignedEnvelope) -> bytes:
    """The exact bytes a signature covers: each binding field length-prefixed, then the payload."""
    parts = [
        DOMAIN_TERMED if env.term else DOMAIN,
        env.kind.encode(),
        env.fleet.encode(),
        env.node.encode(),
        env.service.encode(),
        str(env.generation).encode(),
        *([str(env.term).encode()] if env.term else []),
        bytes(env.payload),
    ]
    return _framed(parts)


def _framed(parts: Sequence[bytes]) -> bytes:
    """``parts`` each length-prefixed, so that no two lists of parts frame alike."""
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def sign(seed: bytes, desired: DesiredState, *, term: int = 0) -> SignedEnvelope:
    """Sign ``desired`` into an envelope bound to its fleet, node, service and generation, and to
    the lease ``term`` of the coordinator that writes it."""
    key, pub = _keypair(seed)
    env = _unsigned(desired, pub, term)
    env.sig = key.sign(signed_bytes(env)).signature
    return env


def _unsigned(desired: DesiredState, pub: str, term: int) -> SignedEnvelope:
    """The envelope of ``desired`` by key ``pub`` under ``term``, its signature still empty."""
    return SignedEnvelope(kind=KIND_DESIRED, fleet=desired.fleet, node=desired.node,
                          service=desired.service, generation=desired.generation,
                          payload=encode(desired), key=pub, term=term)


def sign_batch(seed: bytes, states: Sequence[DesiredState], *,
               term: int = 0) -> list[SignedEnvelope]:
    """``states`` signed with one signature over the Merkle root of their envelopes (see the
    module docstring), each envelope carrying its proof; fewer than two are signed one by one."""
    if len(states) < 2:
        return [sign(seed, d, term=term) for d in states]
    key, pub = _keypair(seed)
    envs = [_unsigned(d, pub, term) for d in states]
    level = [_leaf_hash(env) for env in envs]
    proofs: list[list[bytes]] = [[] for _ in envs]
    under: list[list[int]] = [[i] for i in range(len(envs))]  # the leaves below each hash
    while len(level) > 1:
        above: list[bytes] = []
        above_under: list[list[int]] = []
        for i in range(0, len(level) - 1, 2):
            left, right = level[i], level[i + 1]
            for leaf in under[i]:
                proofs[leaf].append(right)
            for leaf in under[i + 1]:
                proofs[leaf].append(left)
            above.append(_inner_hash(left, right))
            above_under.append(under[i] + under[i + 1])
        if len(level) % 2:  # the odd one out goes up as it is: its leaves' paths skip a level
            above.append(level[-1])
            above_under.append(under[-1])
        level, under = above, above_under
    sig = key.sign(batch_bytes(level[0])).signature
    for env, proof in zip(envs, proofs, strict=True):
        env.proof = b"".join(proof)
        env.sig = sig
    return envs


def batch_bytes(root: bytes) -> bytes:
    """The exact bytes a batch signature covers: the batch domain tag, then the root."""
    return _framed((DOMAIN_BATCH, root))


def batch_root(env: SignedEnvelope) -> bytes:
    """The Merkle root that ``env``'s leaf and proof lead to; ProtocolError for a proof that
    is not whole 32-byte hashes, or is longer than any batch's."""
    proof = bytes(env.proof)
    if len(proof) % HASH_SIZE or len(proof) > MAX_PROOF * HASH_SIZE:
        raise ProtocolError(f"refused envelope: unusable batch proof ({len(proof)} bytes; "
                            f"whole {HASH_SIZE}-byte hashes, at most {MAX_PROOF})")
    node = _leaf_hash(env)
    for at in range(0, len(proof), HASH_SIZE):
        node = _inner_hash(node, proof[at:at + HASH_SIZE])
    return node


def _leaf_hash(env: SignedEnvelope) -> bytes:
    return hashlib.sha256(_LEAF + signed_bytes(env)).digest()


def _inner_hash(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(_INNER + a + b if a <= b else _INNER + b + a).digest()


def resign(seed: bytes, env: SignedEnvelope, *, term: int) -> SignedEnvelope:
    """``env`` signed again by ``seed`` under lease ``term``: the same generation and the very
    same payload bytes (not re-encoded: a newer coordinator's encoding may differ, and an agent
    accepts a re-signature only of the bytes it runs)."""
    key, pub = _keypair(seed)
    out = msgspec.structs.replace(env, key=pub, term=term, sig=b"", proof=b"")
    out.sig = key.sign(signed_bytes(out)).signature
    return out


def resigns(env: SignedEnvelope, running: SignedEnvelope | None) -> bool:
    """Whether ``env`` carries exactly the state of ``running`` (same generation and payload
    bytes), so accepting it changes nothing but the signature."""
    return (running is not None and env.generation == running.generation
            and bytes(env.payload) == bytes(running.payload))


def verify(
    env: SignedEnvelope,
    trusted_public_keys: Collection[str],
    *,
    fleet: str,
    node: str,
    service: str,
    min_generation: int,
    min_term: int = 0,
    running: SignedEnvelope | None = None,
) -> DesiredState:
    """Return the DesiredState in ``env`` if it is genuine and meant for us; else ProtocolError.

    ``min_term``: the lease term of the state the agent runs now; a lower one comes from a
    coordinator that has since been deposed (or is a replay) and is refused. ``running``: the
    envelope the agent runs (or remembers); a re-signature of it (``resigns``) may have the
    generation ``min_generation`` itself."""
    if env.kind != KIND_DESIRED:
        raise ProtocolError(f"refused envelope: kind {env.kind!r} is not {KIND_DESIRED!r}")
    if env.key not in trusted_public_keys:
        raise ProtocolError(
            f"refused envelope: signed by unknown key {env.key[:12]!r}...; trust it in the agent "
            "configuration if it is the coordinator's"
        )
    try:
        if env.proof:
            _verify_root(env.key, batch_root(env), bytes(env.sig))
        else:
            _verify_key(env.key).verify(signed_bytes(env), bytes(env.sig))
    except nacl.exceptions.BadSignatureError:
        raise ProtocolError("refused envelope: bad signature (tampered or forged)") from None
    except (ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
        raise ProtocolError(f"refused envelope: unusable signature: {exc}") from None
    for name, want in (("fleet", fleet), ("node", node), ("service", service)):
        got = getattr(env, name)
        if got != want:
            raise ProtocolError(f"refused envelope: addressed to {name} {got!r}, not {want!r}")
    if env.generation < min_generation or (
            env.generation == min_generation and not resigns(env, running)):
        raise ProtocolError(
            f"refused envelope: generation {env.generation} is not newer than {min_generation} "
            "(replayed or stale)"
        )
    if env.term < max(min_term, 0):
        raise ProtocolError(
            f"refused envelope: lease term {env.term} is older than term {min_term} already "
            "seen (written by a deposed coordinator, or replayed)"
        )
    desired = decode(DesiredState, env.payload)
    for name in ("fleet", "node", "service", "generation"):
        if getattr(desired, name) != getattr(env, name):
            raise ProtocolError(
                f"refused envelope: payload {name} {getattr(desired, name)!r} disagrees with the "
                f"envelope's {getattr(env, name)!r}"
            )
    return desired


# -- keys ------------------------------------------------------------------------------------------


def _keypair(seed: bytes) -> tuple[nacl.signing.SigningKey, str]:
    return _keypair_of(bytes(seed))


@functools.lru_cache(maxsize=8)  # a coordinator signs thousands of states with one seed
def _keypair_of(seed: bytes) -> tuple[nacl.signing.SigningKey, str]:
    try:
        kp = nkeys.from_seed(bytes(seed))
        pub: str = kp.public_key.decode()
    except (nkeys.NkeysError, binascii.Error, ValueError, TypeError, IndexError):
        raise ProtocolError("not an nkeys seed (expected text starting with 'S')") from None
    key: nacl.signing.SigningKey = kp._keys  # nkeys exposes no public accessor for the signing key
    return key, pub


@functools.lru_cache(maxsize=256)
def _verify_root(public: str, root: bytes, sig: bytes) -> None:
    """Check a batch signature over ``root``; remembered once it holds (a failure raises, which
    is never cached), so the nodes of one batch in one process cost one check."""
    _verify_key(public).verify(batch_bytes(root), sig)


@functools.lru_cache(maxsize=64)
def _verify_key(public: str) -> nacl.signing.VerifyKey:
    """Decode an nkeys public key (prefix byte, 32 key bytes, crc16) into an ed25519 verify key.

    Cached: a node checks every envelope against one of a few trusted keys, and the decoding
    (base32, crc16) was 5 % of what verifying 10,000 envelopes cost; a key it refuses raises,
    which is never cached."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        raise ProtocolError(f"refused envelope: key {public[:12]!r} is not an nkeys key") from None
    if len(raw) != 35 or raw[0] != _PREFIX:
        raise ProtocolError(f"refused envelope: key {public[:12]!r} is not a coordinator key")
    if nkeys.crc16(bytearray(raw[:33])) != int.from_bytes(raw[33:], "little"):
        raise ProtocolError(f"refused envelope: key {public[:12]!r} has a bad checksum")
    return nacl.signing.VerifyKey(raw[1:33])
