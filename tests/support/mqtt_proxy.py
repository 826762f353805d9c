"""A loss-injecting MQTT proxy on loopback, for chaos tests: a faulty network between one client and a broker.

:class:`MqttProxy` listens on a free 127.0.0.1 port and forwards every client connection to the broker at
``upstream``. It reads both directions packet by packet (fixed header, variable-length "remaining length") and,
for broker → client PUBLISH packets whose topic matches ``topic_filter`` (MQTT wildcards ``+`` and ``#``),
applies one seeded random fault with the given probabilities (at most one fault per packet):

- **drop**: the packet is not forwarded. With ``ack_dropped`` (the default) the proxy PUBACKs a QoS 1 packet to
  the broker in the client's name, so the loss is end to end — the broker believes it delivered, as when a
  message is lost upstream of the subscriber's session — and the broker's inflight window stays open. Without
  it the broker holds the message unacknowledged in its inflight window (mosquitto re-sends only after a
  reconnect), which is what a lost PUBLISH on a live connection would look like if TCP allowed it.
- **duplicate**: forwarded twice (the copy with the DUP flag). The client's second PUBACK for that packet id is
  not passed on, so the broker sees one acknowledgement.
- **reorder**: held back and forwarded right after the next broker → client packet (counted as ``reordered``),
  or after ``hold_max_s`` when none follows (counted as ``held_released_late``).
- **corrupt**: the application payload passes through ``corrupt_fn`` (default: 1–3 random bytes flipped); the
  MQTT packet stays well-formed (its remaining length is recomputed when the payload's length changed).

Beside the random faults: :meth:`MqttProxy.cut` severs every connection now; :meth:`pause` / :meth:`resume`
blackhole traffic (nothing passes in either direction and nothing is lost: the endpoints' keepalive decides
whether a connection survives); :meth:`refuse` makes the network "down" (every connection cut, new ones closed
at once) until :meth:`accept`; ``pace_s`` makes the link slow for matched packets; :meth:`stall_after` pauses
by itself after the N-th matched PUBLISH forwarded (a reproducible "middle of a transfer").

:meth:`counters` says what it did, per fault, so a test can assert the faults really happened.

Limits: MQTT 3.1.1 and 5 (the protocol level is read from CONNECT); faults apply to QoS 0 and 1 (QoS 2 packets
pass untouched); topic aliases are not resolved (paho does not ask for them), so an aliased PUBLISH without a
topic is not matched. Threads, stdlib only; one thread per direction per connection.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COUNTERS", "MqttProxy", "Packet", "decode_publish", "encode_publish", "topic_matches"]

PUBLISH, PUBACK, CONNECT = 3, 4, 1
COUNTERS = (
    "matched",  # broker -> client PUBLISH packets on the topic filter
    "forwarded_matched",  # ... forwarded to the client (a duplicate counts once)
    "dropped",
    "duplicated",
    "reordered",  # held back and overtaken by the next packet
    "held_released_late",  # held back, nothing came to overtake it within hold_max_s
    "corrupted",
    "acks_injected",  # PUBACKs sent to the broker for dropped packets (ack_dropped)
    "acks_swallowed",  # the client's second PUBACK of a duplicated packet, not passed on
    "dropped_unacked",  # dropped QoS 1 packets left unacknowledged at the broker (ack_dropped=False)
    "connections",
    "refused",  # connections closed at once while refusing
    "cuts",  # cut() calls
    "connections_cut",
    "pauses",  # pause() calls and stalls
)
_MAX_REMAINING = 268_435_455  # MQTT's largest remaining length


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    for _ in range(4):
        byte = buf[pos]
        pos += 1
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, pos
        mult *= 128
    raise ValueError("malformed variable byte integer")


@dataclass
class Packet:
    """One MQTT control packet: the first byte of its fixed header and its body (after the remaining length)."""

    first: int
    body: bytes

    @property
    def kind(self) -> int:
        return self.first >> 4

    def encode(self) -> bytes:
        return bytes([self.first]) + _varint(len(self.body)) + self.body


@dataclass
class Publish:
    first: int  # the fixed header's first byte (flags: DUP, QoS, RETAIN)
    topic: str
    packet_id: int | None  # None at QoS 0
    properties: bytes  # MQTT 5: the property length and properties, as received; b"" for 3.1.1
    payload: bytes

    @property
    def qos(self) -> int:
        return (self.first >> 1) & 3


def decode_publish(packet: Packet, *, mqtt5: bool) -> Publish:
    """The parts of a PUBLISH packet. Raises ValueError when it is malformed."""
    body = packet.body
    n = int.from_bytes(body[0:2], "big")
    topic = body[2 : 2 + n].decode("utf-8")
    pos = 2 + n
    qos = (packet.first >> 1) & 3
    pid = None
    if qos:
        pid = int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
    props = b""
    if mqtt5:
        length, end = _read_varint(body, pos)
        props = body[pos : end + length]
        pos = end + length
    if pos > len(body):
        raise ValueError("truncated PUBLISH")
    return Publish(packet.first, topic, pid, props, body[pos:])


def encode_publish(p: Publish) -> Packet:
    topic = p.topic.encode("utf-8")
    pid = b"" if p.packet_id is None else p.packet_id.to_bytes(2, "big")
    return Packet(p.first, len(topic).to_bytes(2, "big") + topic + pid + p.properties + p.payload)


def flip_bytes(payload: bytes, rng: random.Random) -> bytes:
    """The default corruption: 1–3 random bytes of ``payload`` flipped (same length)."""
    if not payload:
        return payload
    out = bytearray(payload)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


class _Closed(Exception):
    """The connection is gone (EOF, reset, or cut)."""


class _Conn:
    """One proxied client connection: two sockets, two pump threads."""

    def __init__(self, proxy: MqttProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client, self.upstream = client, upstream
        self.mqtt5 = False
        self.swallow: Counter[int] = Counter()  # packet ids whose next client PUBACK is not passed on
        self.to_client = threading.Lock()
        self.to_broker = threading.Lock()
        self.held: Packet | None = None  # a PUBLISH held back for reordering
        self.held_at = 0.0
        self.last_match = 0.0  # when the last matched PUBLISH went through (pace_s)
        self.closed = threading.Event()

    def start(self) -> None:
        for target, name in ((self._client_to_broker, "c2b"), (self._broker_to_client, "b2c")):
            threading.Thread(target=self._run, args=(target,), name=f"mqtt-proxy-{name}", daemon=True).start()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self.proxy._forget(self)

    def _run(self, pump: Callable[[], None]) -> None:
        try:
            pump()
        except (_Closed, OSError, ValueError):
            pass
        finally:
            self.close()

    # -- I/O -------------------------------------------------------------------------------------------------

    def _recv_exact(self, sock: socket.socket, n: int, *, flush_held: bool = False) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.closed.is_set():
                raise _Closed
            if flush_held and self.held is not None and not select.select([sock], [], [], self.proxy.hold_max_s)[0]:
                self._flush_held(late=True)  # nothing came to overtake the held packet
                continue
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise _Closed
            buf += chunk
        return bytes(buf)

    def _read(self, sock: socket.socket, *, flush_held: bool = False) -> Packet:
        first = self._recv_exact(sock, 1, flush_held=flush_held)[0]
        length, mult = 0, 1
        for _ in range(4):
            byte = self._recv_exact(sock, 1)[0]
            length += (byte & 0x7F) * mult
            if not byte & 0x80:
                break
            mult *= 128
        else:
            raise ValueError("malformed remaining length")
        return Packet(first, self._recv_exact(sock, length) if length else b"")

    def _send(self, sock: socket.socket, lock: threading.Lock, data: bytes) -> None:
        self.proxy._wait_unpaused(self)
        with lock:
            if self.closed.is_set():
                raise _Closed
            sock.sendall(data)

    def _to_client(self, packet: Packet) -> None:
        self._send(self.client, self.to_client, packet.encode())

    def _to_broker(self, packet: Packet) -> None:
        self._send(self.upstream, self.to_broker, packet.encode())

    # -- pumps -----------------------------------------------------------------------------------------------

    def _client_to_broker(self) -> None:
        while True:
            packet = self._read(self.client)
            if packet.kind == CONNECT:
                self._note_connect(packet)
            elif packet.kind == PUBACK and len(packet.body) >= 2:
                pid = int.from_bytes(packet.body[:2], "big")
                with self.proxy._lock:
                    swallow = self.swallow[pid] > 0
                    if swallow:
                        self.swallow[pid] -= 1
                        self.proxy._counts["acks_swallowed"] += 1
                if swallow:
                    continue
            self.proxy._wait_unpaused(self)
            self._to_broker(packet)

    def _note_connect(self, packet: Packet) -> None:
        n = int.from_bytes(packet.body[0:2], "big")
        if len(packet.body) > 2 + n:
            self.mqtt5 = packet.body[2 + n] == 5

    def _broker_to_client(self) -> None:
        while True:
            packet = self._read(self.upstream, flush_held=True)
            self.proxy._wait_unpaused(self)
            if packet.kind == PUBLISH:
                self._publish(packet)
            else:
                self._to_client(packet)
                self._flush_held()

    def _flush_held(self, *, late: bool = False) -> None:
        held = self.held
        if held is None or (late and time.monotonic() - self.held_at < self.proxy.hold_max_s):
            return
        self.held = None
        self._to_client(held)
        self.proxy._count("held_released_late" if late else "reordered")
        self.proxy._forwarded_match()

    def _publish(self, packet: Packet) -> None:
        proxy = self.proxy
        try:
            pub = decode_publish(packet, mqtt5=self.mqtt5)
        except (ValueError, UnicodeDecodeError, IndexError):
            self._to_client(packet)
            return
        if pub.qos > 1 or not topic_matches(proxy.topic_filter, pub.topic):
            self._to_client(packet)
            self._flush_held()
            return
        if proxy.pace_s > 0:  # a slow link: matched packets at most one per pace_s
            wait = self.last_match + proxy.pace_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.last_match = time.monotonic()
        fault = proxy._draw()
        if fault == "drop":
            if pub.packet_id is not None:
                if proxy.ack_dropped:
                    self._to_broker(Packet(PUBACK << 4, pub.packet_id.to_bytes(2, "big")))
                    proxy._count("acks_injected")
                else:
                    proxy._count("dropped_unacked")
            proxy._count("dropped")
            return
        if fault == "corrupt":
            pub.payload = proxy.corrupt_fn(pub.payload, proxy._rng_for_corrupt())
            packet = encode_publish(pub)
            proxy._count("corrupted")
        if fault == "reorder" and self.held is None:
            self.held, self.held_at = packet, time.monotonic()
            return
        self._to_client(packet)
        if fault == "duplicate":
            if pub.packet_id is not None:
                with proxy._lock:
                    self.swallow[pub.packet_id] += 1
            self._to_client(Packet(packet.first | 0x08, packet.body))
            proxy._count("duplicated")
        self._flush_held()
        proxy._forwarded_match()


class MqttProxy:
    """See the module docstring. ``start()``, connect clients to :attr:`url`, ``stop()``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        topic_filter: str = "edgeops/v1/+/release/+/chunk",
        seed: int = 0,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        corrupt: float = 0.0,
        corrupt_fn: Callable[[bytes, random.Random], bytes] = flip_bytes,
        ack_dropped: bool = True,
        hold_max_s: float = 0.2,  # a reordered packet waits at most this long for a packet to overtake it
        pace_s: float = 0.0,  # a slow link: at least this many seconds between two matched PUBLISH packets
    ) -> None:
        if min(drop, duplicate, reorder, corrupt) < 0 or drop + duplicate + reorder + corrupt > 1:
            raise ValueError("fault probabilities must be >= 0 and add up to at most 1")
        self.upstream = (upstream_host, upstream_port)
        self.topic_filter = topic_filter
        self.ack_dropped = ack_dropped
        self.corrupt_fn = corrupt_fn
        self.hold_max_s = hold_max_s
        self.pace_s = pace_s
        self._p = (("drop", drop), ("duplicate", duplicate), ("reorder", reorder), ("corrupt", corrupt))
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._conns: set[_Conn] = set()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._refusing = False
        self._stall_at: int | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> MqttProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="mqtt-proxy-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._unpaused.set()
        self.cut(count=False)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> MqttProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- network faults --------------------------------------------------------------------------------------

    def cut(self, *, count: bool = True) -> int:
        """Sever every connection now (both sides see the TCP connection closed). Returns how many."""
        with self._lock:
            conns = list(self._conns)
            if count:
                self._counts["cuts"] += 1
                self._counts["connections_cut"] += len(conns)
        for c in conns:
            c.close()
        return len(conns)

    def pause(self) -> None:
        """Blackhole: nothing passes in either direction (and nothing is lost) until :meth:`resume`."""
        with self._lock:
            self._counts["pauses"] += 1
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def refuse(self) -> None:
        """The network is down: every connection is cut and new ones are closed at once, until :meth:`accept`."""
        with self._lock:
            self._refusing = True
        self.cut()

    def accept(self) -> None:
        with self._lock:
            self._refusing = False

    def stall_after(self, n: int) -> None:
        """Pause by itself once ``n`` more matched PUBLISH packets have been forwarded."""
        with self._lock:
            self._stall_at = self._counts["forwarded_matched"] + n

    def counters(self) -> dict[str, int]:
        """What the proxy did, per fault and event (see :data:`COUNTERS`)."""
        keys = COUNTERS
        with self._lock:
            return {k: self._counts[k] for k in keys}

    # -- internals -------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while self._sock is not None:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
                self._counts["refused" if refusing else "connections"] += 1
            if refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:  # the broker is away: the client sees its connection closed
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, client, upstream)
            with self._lock:
                self._conns.add(conn)
            conn.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _wait_unpaused(self, conn: _Conn) -> None:
        while not self._unpaused.wait(0.1):
            if conn.closed.is_set():
                raise _Closed

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _draw(self) -> str | None:
        with self._lock:
            self._counts["matched"] += 1
            r = self._rng.random()
        for name, p in self._p:
            if r < p:
                return name
            r -= p
        return None

    def _rng_for_corrupt(self) -> random.Random:
        with self._lock:
            return random.Random(self._rng.getrandbits(64))

    def _forwarded_match(self) -> None:
        with self._lock:
            self._counts["forwarded_matched"] += 1
            stall = self._stall_at is not None and self._counts["forwarded_matched"] >= self._stall_at
            if stall:
                self._stall_at = None
                self._counts["pauses"] += 1
                self._unpaused.clear()
