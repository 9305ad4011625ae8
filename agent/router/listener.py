"""Closing a listening socket without resetting the connections it has already taken.

The kernel completes a TCP handshake before the process accepts the connection: the client's
``connect`` has returned, and it has usually sent its request, while the connection still waits
in the listener's accept queue. Closing the listener then resets every such connection (RST):
the client sees ``ECONNRESET`` for a request nobody read. Under load that is a request failed on
every stop, even though the router promised to answer what it had taken.

So a router stops accepting in three steps (``close_gracefully``):
1. a socket filter on the listener drops new SYNs (pure SYN: the final ACK of a handshake already
   under way still passes). A client that connects now gets no answer to its SYN, retransmits
   after a second and is then refused by the closed port: a new connection is delayed once,
   never taken and reset;
2. the event loop accepts what the queue holds (its own accept loop; the queue length is read
   from ``TCP_INFO``, the figure ``ss -l`` shows as Recv-Q) until it is empty, bounded;
3. the listener is closed.

Where the filter cannot be attached (not Linux), step 1 is skipped and steps 2-3 narrow the window
to what arrives between the last look at the queue and the close.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
import time

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
QUEUE_POLL = 0.002  # how often the accept queue is looked at while the loop empties it

# Classic BPF, run on each segment for the listener with the data at the TCP header: drop it
# (return 0) when of the SYN and ACK flags (byte 13) only SYN is set, keep it whole otherwise.
_DROP_NEW_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]          the flags byte
    (0x54, 0, 0, 0x12),  # and #0x12       SYN | ACK
    (0x15, 0, 1, 0x02),  # jeq #0x02       only SYN: a new connection
    (0x06, 0, 0, 0),  # ret #0             drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1   keep
)
_FILTER = (ctypes.c_ubyte * (8 * len(_DROP_NEW_SYN))).from_buffer_copy(
    b"".join(struct.pack("HBBI", *ins) for ins in _DROP_NEW_SYN)
)  # module-level: the kernel copies it at attach time, but it must outlive the call


def refuse_new_connections(sock: socket.socket) -> bool:
    """Attach the drop-new-SYN filter to a listening socket; False where it cannot be."""
    if sys.platform != "linux":
        return False
    prog = struct.pack("HxxxxxxQ", len(_DROP_NEW_SYN), ctypes.addressof(_FILTER))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
    except OSError as exc:
        log.warning("cannot filter new connections on the listener (%s): a connection that "
                    "arrives while it closes may be reset", exc)
        return False
    return True


def accept_queue(sock: socket.socket) -> int:
    """Connections the kernel has completed and the process has not accepted yet (0 if unknown).

    For a listening socket Linux reports its accept queue in ``tcpi_unacked`` (offset 24)."""
    if sys.platform != "linux":
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return 0
    return struct.unpack_from("I", info, 24)[0] if len(info) >= 28 else 0


async def close_gracefully(server: asyncio.Server, *, within: float) -> int:
    """Stop ``server`` taking connections, accept what the kernel already took, then close it.

    Waits at most ``within`` seconds for the accept queue to empty; returns how many connections
    were still queued when it closed (0 unless the deadline cut the wait)."""
    raw = [socket.socket(fileno=s.fileno()) for s in server.sockets]  # views, detached below
    try:
        for sock in raw:
            refuse_new_connections(sock)
        deadline = time.monotonic() + within
        queued = sum(accept_queue(s) for s in raw)
        while queued and time.monotonic() < deadline:
            await asyncio.sleep(QUEUE_POLL)  # the loop's accept handler empties the queue
            queued = sum(accept_queue(s) for s in raw)
    finally:
        for sock in raw:
            sock.detach()  # the server owns the descriptor: do not close it here
        server.close()  # (even if cancelled while waiting: else it would keep the port)
    if queued:
        log.warning("closed the listener with %d connections not yet accepted", queued)
    return queued
