"""The blocking consume loop shared by every backend: ack after handler, retry, dead letters.

One loop iteration: receive a batch (as many as are available, up to ``batch_size``; waits only
when none are), run the handler, ack the messages it finished, dead-letter those that failed
``max_attempts`` times, and hand the rest back for redelivery after an exponential backoff. A handler that knows a message
can never succeed signals :class:`Reject`, which dead-letters it at once; one that failed for
reasons outside the message (disk full) signals :class:`Retry`, which never dead-letters.
SIGINT/SIGTERM (when called from the main thread), ``broker.stop()`` or ``stop_event`` end the
loop after the current batch; the consumer is then closed, which hands back anything unacked.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from MessageBroker.broker_interface import BrokerInterface, Consumer, Message
from MessageBroker.errors import AuthenticationError, BrokerClosedError, BrokerError, TopicNotFoundError

logger = logging.getLogger(__name__)

# Waiting cannot fix these: the loop raises them instead of retrying.
_FATAL = (TopicNotFoundError, BrokerClosedError, AuthenticationError)

BatchHandler = Callable[[list[Message]], "Mapping[str, BaseException] | None"]


class Reject(Exception):
    """Raised (or returned) by a handler for a message that can never succeed.

    The message goes to the dead-letter topic at once with this reason, without retries.
    """


class Retry(Exception):
    """Raised by a handler when the failure is not the message's fault (disk full, service down).

    The batch is handed back after a backoff and never dead-lettered for it, however often it
    happens: the stream waits until the cause is fixed.
    """


@dataclass
class ConsumeStats:
    """Counts of one ``subscribe`` run."""

    received: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0


@dataclass(frozen=True)
class Backoff:
    """Delay before a failed message is handed back: ``initial * 2**(attempt-1)``, capped."""

    initial: float = 0.1
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * (2 ** max(0, attempt - 1)))


def per_message(handler: Callable[[Message], object]) -> BatchHandler:
    """Adapt a one-message handler to the batch loop; each message fails on its own."""

    def handle(batch: list[Message]) -> dict[str, BaseException]:
        failures: dict[str, BaseException] = {}
        for message in batch:
            try:
                handler(message)
            except Exception as exc:  # noqa: BLE001 - any handler error means redelivery
                failures[message.id] = exc
        return failures

    return handle


def run(
    broker: BrokerInterface,
    topic: str,
    group: str,
    handler: BatchHandler,
    *,
    batch_size: int = 100,
    max_wait: float = 0.5,
    max_attempts: int | None = None,
    backoff: Backoff = Backoff(),
    stop_event: threading.Event | None = None,
    handle_signals: bool = True,
    max_outstanding: int = 1000,
) -> ConsumeStats:
    """Consume until stopped; see the module docstring. Returns the run's counts.

    A broker that stops answering (hung, restarting) does not end the loop: receive, ack and
    dead-letter failures are logged and retried with backoff, and whatever was not acked is
    delivered again later. Errors that waiting cannot fix (topic deleted, credentials rejected,
    broker closed) are raised.
    """
    loop = _Loop(broker, topic, handler, max_attempts or broker.max_attempts, backoff,
                 stop_event or threading.Event())
    with _stop_on_signals(loop.stop, enabled=handle_signals):
        consumer = broker.consumer(topic, group, max_outstanding=max(max_outstanding, batch_size))
        try:
            while not loop.stopped():
                batch = loop.guard("receive", lambda: consumer.receive(batch_size, timeout=max_wait))
                if batch:
                    loop.handle(consumer, batch)
        finally:
            consumer.close()
    return loop.stats


class _Loop:
    """One subscription's state: counts, the stop event and the broker-trouble backoff."""

    def __init__(self, broker: BrokerInterface, topic: str, handler: BatchHandler, attempts_allowed: int,
                 backoff: Backoff, stop: threading.Event):
        self.broker, self.topic, self.handler = broker, topic, handler
        self.attempts_allowed, self.backoff, self.stop = attempts_allowed, backoff, stop
        self.stats = ConsumeStats()
        self._troubles = 0

    def stopped(self) -> bool:
        return self.stop.is_set() or self.broker.stop_requested.is_set()

    def guard(self, action: str, call: Callable[[], Any]) -> Any:
        """Run a broker call; on a transient broker error log it, back off and return None."""
        try:
            result = call()
        except _FATAL:
            raise
        except BrokerError as exc:
            self._troubles += 1
            delay = self.backoff.delay(self._troubles)
            logger.warning("%s on %r failed (%s); retrying in %.1f s", action, self.topic, exc, delay)
            self.stop.wait(delay)
            return None
        self._troubles = 0
        return result

    def handle(self, consumer: Consumer, batch: list[Message]) -> None:
        self.stats.received += len(batch)
        failures = _call(self.handler, batch)
        done = [m for m in batch if m.id not in failures]
        if done and self.guard("ack", lambda: consumer.ack(done) or True):
            self.stats.acked += len(done)
        failed = [m for m in batch if m.id in failures]
        exhausted = [m for m in failed if _exhausted(m, failures[m.id], self.attempts_allowed)]
        dead_ids = {m.id for m in exhausted}
        retry = [m for m in failed if m.id not in dead_ids]
        if exhausted:
            letters = [(m, _reason(failures[m.id])) for m in exhausted]
            if self.guard("dead-letter", lambda: consumer.dead_letter(letters) or True):
                self.stats.dead_lettered += len(exhausted)
                for message, reason in letters:
                    logger.warning("dead-lettered message %s of %r after %d attempts: %s",
                                   message.id, self.topic, message.delivery_attempt, reason)
            else:
                retry += exhausted  # not acked: hand back, dead-letter again on a later delivery
        if retry:
            self.stats.retried += len(retry)
            logger.warning("%d message(s) of %r handed back for another try: %s",
                           len(retry), self.topic, _reason(failures[retry[0].id]))
            # Wait on the stop event, so a shutdown is not delayed by the backoff.
            self.stop.wait(self.backoff.delay(max(m.delivery_attempt for m in retry)))
            self.guard("nack", lambda: consumer.nack(retry))


def _call(handler: BatchHandler, batch: list[Message]) -> Mapping[str, BaseException]:
    try:
        return handler(batch) or {}
    except Exception as exc:  # noqa: BLE001 - a failing batch handler fails every message
        logger.debug("batch handler failed for %d messages: %s", len(batch), exc)
        return {m.id: exc for m in batch}


def _exhausted(message: Message, error: BaseException, attempts_allowed: int) -> bool:
    if isinstance(error, Reject):
        return True
    return not isinstance(error, Retry) and message.delivery_attempt >= attempts_allowed


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, Reject) else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, *, enabled: bool) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into ``stop.set()`` while the loop runs (main thread only)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
