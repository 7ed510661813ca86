"""Model server, publishing side: this server's durable queue → ``inference_topic``.

Reads queued results in order, publishes them in batches, and removes them from the queue
only after the broker confirmed every message of the batch. If publishing fails the same batch
is retried with backoff (never skipped); on SIGINT/SIGTERM the current batch is finished or left
in the queue. Waiting for new items is event-driven (the queue writer wakes the reader).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading

from MessageBroker.broker_interface import OutgoingMessage
from MessageBroker.errors import BrokerError
from MessageBroker.message_broker_factory import create_from_args
from Pipeline import cli
from Pipeline.config import load_config
from Pipeline.events import EventError, ResultEvent
from Queue import FileQueueReader, QueueItem

logger = logging.getLogger("model_server_pub")

MAX_BACKOFF_SECONDS = 10.0


def to_messages(items: list[QueueItem]) -> tuple[list[OutgoingMessage], list[tuple[QueueItem, str]]]:
    """Result messages for queue items, and the items that are not valid results (with why)."""
    messages, broken = [], []
    for item in items:
        try:
            messages.append(ResultEvent.from_json(item.payload).to_message())
        except EventError as exc:
            broken.append((item, str(exc)))
    return messages, broken


class ResultPublisher:
    """Drains a queue into a topic; stops between batches when ``stop`` is set."""

    def __init__(self, reader: FileQueueReader, broker, topic: str, batch_size: int, max_wait: float):  # type: ignore[no-untyped-def]
        self.reader, self.broker, self.topic = reader, broker, topic
        self.batch_size, self.max_wait = batch_size, max_wait
        self.stop = threading.Event()
        self.published = 0

    def run(self) -> None:
        while not self.stop.is_set():
            items = self.reader.read(self.batch_size, timeout=self.max_wait)
            if items and self._publish_until_confirmed(items):
                self.reader.ack(items[-1].seq)
                self.published += len(items)

    def _publish_until_confirmed(self, items: list[QueueItem]) -> bool:
        """True once the broker confirmed the batch; False if asked to stop first."""
        messages, broken = to_messages(items)
        failures = 0
        while not self.stop.is_set():
            try:
                if messages:
                    self.broker.publish_batch(self.topic, messages)
                if broken:
                    self._dead_letter(broken)
                return True
            except BrokerError as exc:
                failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.2 * 2 ** (failures - 1))
                logger.warning("publishing %d results failed (%s); retrying in %.1f s", len(items), exc, delay)
                self.stop.wait(delay)
        return False

    def _dead_letter(self, broken: list[tuple[QueueItem, str]]) -> None:
        # A queue record that is not a valid result should never happen; keep it, don't drop it.
        topic = self.broker.dead_letter_topic(self.topic)
        self.broker.create_topic(topic)
        letters = [OutgoingMessage(item.payload, None, {"dead_letter_reason": f"invalid queued result: {why}",
                                                        "queue_seq": str(item.seq)}) for item, why in broken]
        self.broker.publish_batch(topic, letters)
        logger.error("%d invalid queue records moved to %r", len(broken), topic)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser(
        "Publish the model server's queued results to the results topic, removing them once confirmed.")
    parser.add_argument("--queue-dir", help="the queue to drain (default: [model_server] queue_dir)")
    parser.add_argument("--batch-size", type=int, help="most results per publish batch (default: [result_publisher] batch_size)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    config = load_config(args.config, overrides={
        ("model_server", "queue_dir"): args.queue_dir,
        ("result_publisher", "batch_size"): None if args.batch_size is None else str(args.batch_size)})
    broker = create_from_args(args)
    with contextlib.closing(broker), contextlib.closing(FileQueueReader(config.queue_dir)) as reader:
        broker.create_topic(config.results_topic)
        broker.ensure_subscription(config.results_topic, config.results_group)
        publisher = ResultPublisher(reader, broker, config.results_topic,
                                    config.publish_batch_size, config.publish_max_wait)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: publisher.stop.set())
        logger.info("publishing queue %s to %r", config.queue_dir, config.results_topic)
        publisher.run()
        logger.info("stopped: %d results published", publisher.published)
    return 0


if __name__ == "__main__":
    cli.run(main)
