"""The outbox thread: drains the :class:`~device_agent.spool.Spool` over the :class:`~device_agent.mqtt_link.MqttLink`.

Guarantees:

- **At least once.** A message leaves the spool only after the broker acknowledged it (PUBACK for QoS 1). A
  batch that fails half-way (disconnect, ack timeout) acks only the prefix the broker confirmed and is retried
  from the oldest unconfirmed message after the next connect. A message can therefore be delivered twice (e.g.
  around a broker restart), never lost; consumers drop duplicates by the ``seq`` that
  :meth:`Spool.put_json <device_agent.spool.Spool.put_json>` embeds. When the spool cannot delete what the
  broker confirmed (a full disk), the outbox remembers those seqs, sends them no more and deletes them later
  (at the next batch or idle check): a restart before that sends them once more.
- **In order.** Messages are published oldest first, in one stream; the first delivery of every message comes
  in spool order (a re-sent copy may repeat an earlier one).
- **Never dies.** Storage and transport errors are logged and retried after a short pause; a message the
  client library can never send (invalid topic, over MQTT's size limit) is dropped with an error log instead
  of blocking the queue forever.
- **Idle is cheap.** With nothing to send, or while disconnected, the thread sleeps until :meth:`Outbox.wake`
  (called after every put and on every connect), checking anyway every ``_IDLE_S`` seconds; after a batch that
  did not go through it tries again ``_RETRY_S`` seconds later. (A simulated fleet of 1,000 agents on 2 cores is
  why: polling threads cost more than the messages.)

Not done here: deciding what to spool (the agent does), or the bound on the spool (the spool does).
"""

from __future__ import annotations

import logging
import threading
import time

from device_agent.fault_points import fault_point
from device_agent.mqtt_link import MqttLink, PublishHandle
from device_agent.spool import Spool, SpooledMessage
from edgeops.errors import StorageError, TransportError

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

_IDLE_S = 5.0  # seconds between checks when idle or disconnected, unless woken (a safety net: puts and connects wake)
_RETRY_S = 0.5  # seconds before the next try after a batch that did not go through


class Outbox:
    """Publishes spooled messages in order and deletes each only after the broker has it."""

    def __init__(self, spool: Spool, link: MqttLink, *, batch: int = 64, ack_timeout_s: float = 10.0) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._spool = spool
        self._link = link
        self._batch = batch
        self._ack_timeout_s = ack_timeout_s
        self._wake = threading.Event()
        self._running = False
        self._thread: threading.Thread | None = None
        self._progress = threading.Condition()  # notified after every batch that emptied part of the spool
        self._delivered: set[int] = set()  # confirmed by the broker, not yet deleted from the spool (a full disk)
        self._delete_failing = False

    def start(self) -> None:
        """Start the drainer thread. Calling it twice is a RuntimeError."""
        if self._thread is not None:
            raise RuntimeError("Outbox.start() called twice")
        self._running = True
        self._thread = threading.Thread(target=self._run, name="edgeops-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (an unfinished batch stays in the spool and is re-sent by the next run)."""
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("outbox: thread did not stop within %.1f s", timeout)
            self._thread = None

    def wake(self) -> None:
        """Send now (call after a put) instead of at the next idle check."""
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until the spool is empty (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        self.wake()
        with self._progress:
            while self._spool.pending() > len(self._delivered):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(min(remaining, _RETRY_S))
        return True

    # -- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while self._running:
            self._wake.clear()
            pause: float | None = _IDLE_S
            try:
                if self._link.connected and self._spool.pending() > len(self._delivered):
                    pause = None if self._send_batch() else _RETRY_S
                elif self._delivered:
                    self._delete_delivered()  # again at the next idle check or wake while it fails
            except StorageError as exc:
                log.error("outbox: %s", exc)
                pause = _RETRY_S
            except Exception:  # the thread must outlive any bug below it; the spool keeps the messages
                log.exception("outbox: unexpected error while sending")
                pause = _RETRY_S
            if pause is not None:
                self._wake.wait(pause)

    def _send_batch(self) -> bool:
        """Publish one batch and ack what the broker confirmed; True when all of it went through."""
        peeked = self._spool.peek(self._batch + len(self._delivered))
        messages = [m for m in peeked if m.seq not in self._delivered][: self._batch]
        sent: list[tuple[SpooledMessage, PublishHandle]] = []
        unsendable: list[int] = []
        complete = True
        for msg in messages:
            try:
                sent.append((msg, self._link.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)))
            except TransportError as exc:
                log.info(
                    "outbox: batch interrupted (%s); %d message(s) wait for the next connection",
                    exc,
                    self._spool.pending(),
                )
                complete = False
                break
            except ValueError as exc:
                if sent:  # keep the order: send what precedes it first, drop it on the next pass
                    break
                log.error("outbox: dropping message %d on %s that cannot be sent: %s", msg.seq, msg.topic, exc)
                unsendable.append(msg.seq)
        fault_point("outbox.published")
        confirmed = self._wait_confirmed(sent)
        fault_point("outbox.confirmed")
        if len(confirmed) < len(sent):
            complete = False
        if confirmed or unsendable:
            self._delivered.update(unsendable + confirmed)
            self._delete_delivered()
            with self._progress:
                self._progress.notify_all()
        return complete

    def _delete_delivered(self) -> None:
        """Delete the delivered messages from the spool. When the spool refuses (a full disk) they stay in
        ``_delivered``, not sent again; the first failure of a streak and the recovery are logged."""
        try:
            self._spool.ack_many(sorted(self._delivered))
        except StorageError as exc:
            if not self._delete_failing:
                log.error("outbox: %s; %d delivered message(s) kept, not re-sent", exc, len(self._delivered))
            self._delete_failing = True
            return
        if self._delete_failing:
            log.warning("outbox: the spool takes deletes again (%d delivered message(s) deleted)", len(self._delivered))
        self._delete_failing = False
        self._delivered.clear()

    def _wait_confirmed(self, sent: list[tuple[SpooledMessage, PublishHandle]]) -> list[int]:
        """The seqs of the longest prefix of ``sent`` the broker acknowledged within the ack timeout."""
        deadline = time.monotonic() + self._ack_timeout_s
        confirmed: list[int] = []
        for msg, handle in sent:
            if not handle.wait(max(0.0, deadline - time.monotonic())):
                log.info("outbox: no PUBACK for message %d on %s; will re-send", msg.seq, msg.topic)
                break
            confirmed.append(msg.seq)
        return confirmed
