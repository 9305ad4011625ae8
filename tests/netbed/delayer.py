"""A userspace delay line on NFQUEUE, in pure Python (no compiled dependencies).

Why: this machine's kernel has no ``sch_netem`` (and no tc classifiers), so ``tc qdisc ... netem
delay`` is not available; netfilter's NFQUEUE target and ``nfnetlink_queue`` are. iptables rules
in a host's network namespace send the packets to be delayed to queue ``--queue``; this process,
run in the same namespace, receives each packet's id over netlink (metadata only, never the
payload) and gives the verdict ACCEPT ``--delay`` seconds after the packet arrived. The delay is
constant, so packets leave in the order they came (a FIFO). The rules use ``--queue-bypass``:
when this process is not running, packets pass undelayed instead of being dropped.

Run it as ``python3 tests/netbed/delayer.py --queue 0 --delay 0.1`` (a script on purpose: it
imports nothing from the project, so it starts fast inside ``ip netns exec``). It prints
``ready`` once bound, and exits on SIGTERM/SIGINT.

The protocol (linux/netfilter/nfnetlink_queue.h): every message is an ``nlmsghdr`` (native byte
order), an ``nfgenmsg`` (family, version, queue number in network byte order) and attributes
(``nlattr``: length, type; payloads in network byte order, padded to 4 bytes).
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270

QUEUE_MAXLEN = 65536
RCVBUF = 16 << 20

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_NFGENMSG = struct.Struct("!BBH")


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags,
                          seq, 0) + body


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    """Split a netlink datagram into (type, payload after nlmsghdr)."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        out.append((kind, data[off + _NLMSGHDR.size: off + length]))
        off += (length + 3) & ~3
    return out


def _packet_id(payload: bytes) -> int | None:
    """The packet id in an NFQNL_MSG_PACKET payload (after its nfgenmsg)."""
    off = _NFGENMSG.size
    while off + _NLATTR.size <= len(payload):
        length, kind = _NLATTR.unpack_from(payload, off)
        if length < _NLATTR.size:
            return None
        if kind & 0x3FFF == NFQA_PACKET_HDR:
            return int(struct.unpack_from("!I", payload, off + _NLATTR.size)[0])
        off += (length + 3) & ~3
    return None


class DelayQueue:
    """One bound NFQUEUE queue whose packets are accepted ``delay`` seconds after they came."""

    def __init__(self, queue: int, delay: float) -> None:
        self.queue = queue
        self.delay = delay
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.seq = 0
        self.pending: collections.deque[tuple[float, int]] = collections.deque()
        self.accepted = 0

    def _config(self, attrs: bytes) -> None:
        """Send one config request and wait for its acknowledgement (OSError if refused)."""
        self.seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, self.seq,
                                NLM_F_REQUEST | NLM_F_ACK))
        while True:
            for kind, payload in _messages(self.sock.recv(65536)):
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(-code, f"nfqueue config refused: {os.strerror(-code)}")
                    return

    def bind(self) -> None:
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IBxxx", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))
        # A full queue lets packets through rather than dropping them: this is a delay line,
        # loss is configured separately (and measured) with iptables' statistic match.
        self._config(_attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
                     + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)))

    def _verdict(self, packet_id: int) -> None:
        self.seq += 1
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue,
                                _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)),
                                self.seq))
        self.accepted += 1

    def run(self, stop: list[bool]) -> None:
        """Receive and release packets until ``stop[0]``; released on time, in order."""
        while not stop[0]:
            now = time.monotonic()
            while self.pending and self.pending[0][0] <= now:
                self._verdict(self.pending.popleft()[1])
            timeout = (self.pending[0][0] - now) if self.pending else 0.5
            try:
                readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            except InterruptedError:
                continue
            if not readable:
                continue
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue
                raise
            arrived = time.monotonic()
            for kind, payload in _messages(data):
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    pid = _packet_id(payload)
                    if pid is not None:
                        self.pending.append((arrived + self.delay, pid))

    def close(self) -> None:
        # Let what waits go now rather than leave it to the kernel when the socket closes.
        for _, pid in self.pending:
            self._verdict(pid)
        self.pending.clear()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay", type=float, required=True, help="seconds")
    args = parser.parse_args(argv)
    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    q = DelayQueue(args.queue, args.delay)
    q.bind()
    print("ready", flush=True)
    try:
        q.run(stop)
    finally:
        q.close()
    print(f"accepted {q.accepted} packets", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
