"""Model server, consuming side: images from the broker → CNN → this server's durable queue.

Takes image events from ``new_image_topic`` in the model servers' consumer group, in
micro-batches (whatever is waiting, up to ``--batch-size``), predicts each batch at once, appends
the results to the queue with one fsync, and only then acks the batch. A bad image is
dead-lettered at once with its reason; a model error is retried (bounded), then dead-lettered;
a full queue disk holds the stream back without dead-lettering anything. Start several
instances (each with its own ``--queue-dir`` and ``model_server_pub.py``) to share the work.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence

from MessageBroker.broker_interface import Message
from MessageBroker.consume_loop import Reject, Retry
from MessageBroker.message_broker_factory import create_from_args
from Pipeline import cli
from Pipeline.config import load_config
from Pipeline.failpoints import wrap_predictor
from Pipeline.events import EventError, ImageEvent, ResultEvent, now_iso
from Queue import FileQueueWriter, QueueWriteError

logger = logging.getLogger("model_server_sub")


class ImageBatchHandler:
    """Turns one batch of image events into queued results; returns per-message failures."""

    def __init__(self, predictor, queue: FileQueueWriter):  # type: ignore[no-untyped-def]
        self.predictor = predictor
        self.queue = queue
        self.predicted = 0
        self.rejected = 0

    def __call__(self, batch: list[Message]) -> Mapping[str, BaseException]:
        failures: dict[str, BaseException] = {}
        events: list[tuple[Message, ImageEvent]] = []
        for message in batch:
            try:
                events.append((message, ImageEvent.from_message(message)))
            except EventError as exc:
                failures[message.id] = Reject(f"invalid image event: {exc}")
        started = time.perf_counter()
        outcomes = self._predict([event.image for _, event in events])
        predict_ms = (time.perf_counter() - started) * 1000 / max(1, len(events))
        records: list[bytes] = []
        sources: list[Message] = []
        for (message, event), outcome in zip(events, outcomes):
            if isinstance(outcome, BaseException):
                failures[message.id] = _as_failure(outcome)
                continue
            records.append(self._result(event, outcome, predict_ms).to_json())
            sources.append(message)
        queued, refused = self._enqueue(records)
        for message in sources[queued:]:  # no room (yet): handed back, never dead-lettered
            failures[message.id] = refused
        self.predicted += queued
        self.rejected += sum(isinstance(f, Reject) for f in failures.values())
        return failures

    def _enqueue(self, records: list[bytes]) -> tuple[int, Retry]:
        """Queue as many results as fit (a capped queue takes part of a batch).

        Returns how many were queued and the reason the rest were not.
        """
        try:
            queued = self.queue.append_fitting(records) if records else 0
        except QueueWriteError as exc:
            return 0, Retry(f"result queue refused the batch: {exc}")
        return queued, Retry(f"result queue full: {len(records) - queued} of {len(records)} results wait for space")

    def _predict(self, images: Sequence[bytes]) -> list[object]:
        """Predict a batch; if the whole batch fails, retry one by one to isolate the culprit."""
        if not images:
            return []
        try:
            return list(self.predictor.predict_many(images))
        except Exception:  # noqa: BLE001 - isolate which input breaks the model
            logger.exception("batch prediction failed; predicting %d images one by one", len(images))
        outcomes: list[object] = []
        for image in images:
            try:
                outcomes.extend(self.predictor.predict_many([image]))
            except Exception as exc:  # noqa: BLE001 - this image's failure, retried by the loop
                outcomes.append(exc)
        return outcomes

    def _result(self, event: ImageEvent, prediction, predict_ms: float) -> ResultEvent:  # type: ignore[no-untyped-def]
        return ResultEvent(
            image_id=event.image_id,
            label=prediction.label,
            confidence=prediction.confidence,
            probabilities=tuple(prediction.probabilities),
            model_version=self.predictor.model_version,
            source=event.source,
            expected_label=event.expected_label,
            timings={"created_at": event.created_at, "predicted_at": now_iso(), "predict_ms": round(predict_ms, 3)},
        )


def _as_failure(outcome: BaseException) -> BaseException:
    from Modelling.errors import ImageError

    if isinstance(outcome, ImageError):
        return Reject(f"invalid image: {outcome.reason}")
    return outcome  # a model failure: retried, dead-lettered after max attempts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser(
        "Consume image events, predict them in micro-batches with the CNN and queue the results durably.")
    parser.add_argument("--queue-dir", help="this server's result queue directory (default: [model_server] queue_dir)")
    parser.add_argument("--checkpoint", help="model checkpoint (.h5 or .keras) (default: [model_server] checkpoint)")
    parser.add_argument("--batch-size", type=int, help="most images per micro-batch (default: [model_server] batch_size)")
    parser.add_argument("--max-wait-ms", type=int, help="longest wait for a batch's first image (default: [model_server] max_wait_ms)")
    parser.add_argument("--max-attempts", type=int, help="tries before a failing image is dead-lettered (default: [model_server] max_attempts)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    config = load_config(args.config, overrides={
        ("model_server", "queue_dir"): args.queue_dir, ("model_server", "checkpoint"): args.checkpoint,
        ("model_server", "batch_size"): _str(args.batch_size), ("model_server", "max_wait_ms"): _str(args.max_wait_ms),
        ("model_server", "max_attempts"): _str(args.max_attempts)})
    from Modelling.predict_cnn import Predictor  # TensorFlow loads only for this script

    # The model is loaded before anything is consumed: a missing model consumes nothing.
    predictor = wrap_predictor(Predictor.load(config.checkpoint))
    logger.info("model %s loaded from %s", predictor.model_version, config.checkpoint)
    broker = create_from_args(args)
    with contextlib.closing(broker), contextlib.closing(
            FileQueueWriter(config.queue_dir, max_bytes=config.queue_max_bytes)) as queue:
        images = config.images_topic
        dead_letters = broker.dead_letter_topic(images)
        for topic in (images, dead_letters):
            broker.create_topic(topic)
        broker.ensure_subscription(images, config.model_server_group)
        broker.ensure_subscription(dead_letters, config.dead_letters_group)
        handler = ImageBatchHandler(predictor, queue)
        logger.info("serving %r in group %r into queue %s", images, config.model_server_group, config.queue_dir)
        stats = broker.subscribe_batches(
            images, handler, config.model_server_group, batch_size=config.consume_batch_size,
            max_wait=config.consume_max_wait, max_attempts=config.max_attempts,
            max_outstanding=2 * config.consume_batch_size)
        logger.info("stopped: %d received, %d predicted and queued, %d dead-lettered, %d retried",
                    stats.received, handler.predicted, stats.dead_lettered, stats.retried)
    return 0


def _str(value: object) -> str | None:
    return None if value is None else str(value)


if __name__ == "__main__":
    cli.run(main)
