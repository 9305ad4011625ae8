"""The protocol package's errors.

    ProtocolError          anything that cannot be decoded, parsed or verified: a malformed
                           message, a manifest with an unknown key, a bad duration, a bad signature.
    BusError               NATS or JetStream failed a request we made
    ├── NotReachable       no NATS server, or nobody answers on a subject (no coordinator)
    ├── Conflict           a KV compare-and-set lost the race (a lock is held, a key changed)
    ├── MissingBucket      a KV bucket the fleet has not created yet (no coordinator ran, or
    │                      nothing was pushed): for a reader, often just "nothing there yet"
    ├── AccessDenied       the server refused our credentials (unknown, revoked) or our TLS
    │                      (no TLS where it is required, a certificate our CA did not sign)
    ├── TooFewServers      more replicas asked for than the JetStream cluster has servers: an
    │                      operator's mistake (retrying does not help), found before anything
    │                      is created
    ├── NoRoom             JetStream cannot reserve the storage a stream's limits ask for (the
    │                      events stream's --events-max-bytes past the server's max_file_store)
    └── ServerTooOld       the coordinator's server predates atomic batch publish (2.12), which
                           fences its writes: upgrading the server is the only fix

Each message says what is wrong and what to do, in one line, so that the CLI can print it as is
and an agent can put it in an event. nats-py's own exceptions never leave ``protocol.bus``.
"""


class ProtocolError(ValueError):
    """A payload, a manifest or a signature that fleetwave refuses; the message says why."""


class BusError(Exception):
    """A NATS or JetStream operation failed; the message says which and why."""


class NotReachable(BusError):
    """Nothing answers: no NATS server at the URL, or no coordinator on the fleet's API."""


class NoResponders(NotReachable):
    """No one subscribes to the subject of a request (the server says so at once)."""


class Conflict(BusError):
    """A compare-and-set write lost: someone else wrote the key first."""


class MissingBucket(BusError):
    """A KV bucket does not exist (yet): the fleet was never set up, or nothing created it."""


class TooFewServers(BusError):
    """The replicas asked for cannot be placed: the JetStream cluster has fewer servers."""


class NoRoom(BusError):
    """JetStream cannot reserve the storage a stream's byte limit asks for."""


class ServerTooOld(BusError):
    """The NATS server is older than the coordinator needs (``protocol.bus.ATOMIC_SINCE``)."""


class AccessDenied(BusError):
    """The server refused this client: credentials it does not know (revoked, another fleet's),
    no TLS where TLS is required, or a server certificate the given CA did not sign."""


class CredentialsLapsed(AccessDenied):
    """The server refused credentials because they have expired: the same fix as the local
    check that refuses them before connecting (``protocol.creds.CredsExpired``), so the CLI
    exits 2 for both; which one speaks depends only on when the expiry fell."""
