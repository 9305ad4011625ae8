"""How the brokers of a secure cluster (``fleetwave broker --auth DIR --cluster-listen ...``)
know each other on their routes: mutual TLS with DIR's server certificate, checked against
DIR's CA, and a route user. Without both a route is refused, so no one without the server key
joins the cluster, reads the traffic between brokers or takes a vote in JetStream's raft groups.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from urllib.parse import urlsplit

from coordinator.auth import pki
from coordinator.auth.enroll import CA, SERVER, SERVER_KEY
from coordinator.errors import UsageError

ROUTE_USER = "fleetwave-route"


def route_password(path: Path) -> str:
    """The password brokers of this fleet give each other on their routes. Derived from the
    server key (every broker holds the same ``server-key.pem``) so that it needs no file of its
    own to copy to each broker and cannot differ between them; knowing it means holding that
    key, which mutual TLS on the routes asks for anyway: this is a second lock, not a new one."""
    key = (path / SERVER_KEY).read_bytes()
    return hmac.new(key, b"fleetwave cluster route password", hashlib.sha256).hexdigest()


def secure_route(route: str, path: Path) -> str:
    """``nats-route://HOST:PORT`` with this fleet's route user and password in it."""
    u = urlsplit(route)
    return f"{u.scheme}://{ROUTE_USER}:{route_password(path)}@{u.netloc.rpartition('@')[2]}"


def check_serves_routes(path: Path) -> None:
    """UsageError (one line) when DIR's server certificate cannot secure cluster routes."""
    try:
        ok = pki.serves_routes((path / SERVER).read_bytes())
    except (OSError, ValueError):
        raise UsageError(f"{path / SERVER} is missing or damaged; restore it from a backup, or "
                         "make a new trust root with 'fleetwave auth init'") from None
    if not ok:
        raise UsageError(
            f"{path / SERVER} was made before brokers secured their routes (it cannot serve "
            "as a client certificate); make a new trust root with 'fleetwave auth init NEWDIR' "
            "to run a secure cluster, or run one broker")


def cluster_block(path: Path) -> str:
    """The lines ``fleetwave broker --auth DIR`` adds inside its ``cluster {}``: routes over
    mutual TLS (each broker shows the server certificate and checks the other's against the
    fleet's CA: ``verify``) and the route user."""
    d = path.absolute()
    return (
        "  tls {\n"
        f'    cert_file: "{d / SERVER}"\n'
        f'    key_file: "{d / SERVER_KEY}"\n'
        f'    ca_file: "{d / CA}"\n'
        "    verify: true\n"
        "    timeout: 2\n"
        "  }\n"
        "  authorization {\n"
        f'    user: "{ROUTE_USER}"\n'
        f'    password: "{route_password(d)}"\n'
        "    timeout: 2\n"
        "  }\n"
    )
