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

from MessageBroker.broker_interface import BrokerInterface, Message

logger = logging.getLogger(__name__)

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
    """Consume until stopped; see the module docstring. Returns the run's counts."""
    attempts_allowed = max_attempts or broker.max_attempts
    stop = stop_event or threading.Event()
    stats = ConsumeStats()
    with _stop_on_signals(stop, enabled=handle_signals):
        consumer = broker.consumer(topic, group, max_outstanding=max(max_outstanding, batch_size))
        try:
            while not (stop.is_set() or broker.stop_requested.is_set()):
                batch = consumer.receive(batch_size, timeout=max_wait)
                if not batch:
                    continue
                stats.received += len(batch)
                failures = _call(handler, batch)
                done = [m for m in batch if m.id not in failures]
                consumer.ack(done)
                stats.acked += len(done)
                failed = [m for m in batch if m.id in failures]
                exhausted = [m for m in failed if _exhausted(m, failures[m.id], attempts_allowed)]
                dead_ids = {m.id for m in exhausted}
                retry = [m for m in failed if m.id not in dead_ids]
                if exhausted:
                    consumer.dead_letter([(m, _reason(failures[m.id])) for m in exhausted])
                    stats.dead_lettered += len(exhausted)
                    for m in exhausted:
                        logger.warning(
                            "dead-lettered message %s of %r after %d attempts: %s",
                            m.id, topic, m.delivery_attempt, _reason(failures[m.id]),
                        )
                if retry:
                    stats.retried += len(retry)
                    # Wait on the stop event, so a shutdown is not delayed by the backoff.
                    stop.wait(backoff.delay(max(m.delivery_attempt for m in retry)))
                    consumer.nack(retry)
        finally:
            consumer.close()
    return stats


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
