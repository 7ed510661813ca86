"""Results consumer and query tool: ``inference_topic`` → the text-file DB in ``DB/``.

Consume mode (default): stores each result event as one JSON line, keyed on ``image_id``
(redeliveries and duplicate inputs leave exactly one row), and acks a batch only after its
write is fsync'd. Dead letters of the images topic are stored beside the results, so bad
inputs are visible here too. A full disk holds the stream back until space returns.

Query mode: ``--get ID``, ``--last N``, ``--counts``, ``--dead-letters``, ``--summary``; safe to
run while a consumer writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Callable, Mapping

from DB import DBWriteError, ResultReader, ResultStore
from MessageBroker.broker_interface import Message
from MessageBroker.consume_loop import Reject, Retry
from MessageBroker.message_broker_factory import create_from_args
from Pipeline import cli
from Pipeline.config import load_config
from Pipeline.events import DeadLetter, EventError, ResultEvent

logger = logging.getLogger("app_2")


class RowWriter:
    """Batch handler: decode events into rows and store them durably before the ack."""

    def __init__(self, decode: Callable[[Message], dict], store_rows: Callable, echo: bool, kind: str):  # type: ignore[type-arg]
        self.decode, self.store_rows, self.echo, self.kind = decode, store_rows, echo, kind
        self.written = self.duplicates = 0
        self._print_lock = threading.Lock()

    def __call__(self, batch: list[Message]) -> Mapping[str, BaseException]:
        failures: dict[str, BaseException] = {}
        rows, sources = [], []
        for message in batch:
            try:
                rows.append(self.decode(message))
                sources.append(message)
            except EventError as exc:
                failures[message.id] = Reject(f"invalid {self.kind} event: {exc}")
        stored, refused = self._store(rows)
        for message in sources[stored:]:  # no room (yet): handed back, never dead-lettered
            failures[message.id] = refused
        if self.echo and stored:
            with self._print_lock:
                for row in rows[:stored]:
                    print(json.dumps({"kind": self.kind, **row}), flush=True)
        return failures

    def _store(self, rows: list[dict]) -> tuple[int, Retry]:  # type: ignore[type-arg]
        """Store as many leading rows as fit (a size-capped DB takes part of a batch).

        Returns how many were stored (or were duplicates) and the reason the rest were not.
        """
        try:
            outcome = self.store_rows(rows, fitting=True)
        except DBWriteError as exc:
            return 0, Retry(f"DB refused the batch: {exc}")
        self.written += outcome.written
        self.duplicates += outcome.duplicates
        done = outcome.written + outcome.duplicates
        return done, Retry(f"DB full: {len(rows) - done} of {len(rows)} rows wait for space")


def query(args: argparse.Namespace, db_dir) -> int:  # type: ignore[no-untyped-def]
    """Answer one query from the DB (no broker needed); prints JSON."""
    with ResultReader(db_dir) as db:
        if args.get:
            row = db.get(args.get)
            print(json.dumps(row) if row else f"no result for image id {args.get!r}")
            return 0 if row else 1
        if args.last:
            for row in db.last(args.last):
                print(json.dumps(row))
        if args.counts:
            print(json.dumps({str(k): v for k, v in sorted(db.label_counts().items(), key=lambda kv: str(kv[0]))}))
        if args.dead_letters:
            for row in db.dead_letters():
                print(json.dumps(row))
        if args.summary:
            print(json.dumps({"results": db.count(), "dead_letters": db.dead_letter_count(),
                              "labels": {str(k): v for k, v in db.label_counts().items()}}))
    return 0


def consume(args: argparse.Namespace, config) -> int:  # type: ignore[no-untyped-def]
    broker = create_from_args(args)
    store = None
    try:
        store = ResultStore(config.db_dir, max_bytes=config.db_max_bytes)
        results, dead_letters = config.results_topic, broker.dead_letter_topic(config.images_topic)
        for topic, group in ((results, config.results_group), (dead_letters, config.dead_letters_group)):
            broker.create_topic(topic)
            broker.ensure_subscription(topic, group)
        options = dict(batch_size=config.db_batch_size, max_outstanding=2 * config.db_batch_size)
        result_writer = RowWriter(lambda m: ResultEvent.from_message(m).to_row(), store.add_results, args.echo, "result")
        letter_writer = RowWriter(lambda m: DeadLetter.from_message(m).to_row(), store.add_dead_letters,
                                  args.echo, "dead_letter")
        stop = threading.Event()
        letters = threading.Thread(target=_run_until_stopped, name="dead-letters", args=(
            broker, dead_letters, letter_writer, config.dead_letters_group, stop, options), daemon=True)
        letters.start()
        logger.info("storing %r and %r into %s", results, dead_letters, config.db_dir)
        try:
            broker.subscribe_batches(results, result_writer, config.results_group, stop_event=stop, **options)
        finally:
            stop.set()
            letters.join()
        logger.info("stopped: %d results stored (%d duplicates skipped), %d dead letters stored",
                    result_writer.written, result_writer.duplicates, letter_writer.written)
    finally:
        if store is not None:
            store.close()
        broker.close()
    return 0


def _run_until_stopped(broker, topic, handler, group, stop, options) -> None:  # type: ignore[no-untyped-def]
    try:
        broker.subscribe_batches(topic, handler, group, stop_event=stop, handle_signals=False, **options)
    except Exception:
        logger.exception("dead-letter consumer failed; stopping")
        stop.set()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser("Store prediction results in the text-file DB (default), or query it.")
    parser.add_argument("--db-dir", help="DB directory (default: [results_db] db_dir)")
    parser.add_argument("--echo", action="store_true", help="print every stored row as a JSON line on stdout")
    queries = parser.add_argument_group("query mode (no broker needed)")
    queries.add_argument("--get", metavar="IMAGE_ID", help="print the result of one image")
    queries.add_argument("--last", type=int, metavar="N", help="print the last N results")
    queries.add_argument("--counts", action="store_true", help="print the number of results per label")
    queries.add_argument("--dead-letters", action="store_true", help="print the dead letters with their reasons")
    queries.add_argument("--summary", action="store_true", help="print counts of results, dead letters and labels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    config = load_config(args.config, overrides={("results_db", "db_dir"): args.db_dir})
    if args.get or args.last or args.counts or args.dead_letters or args.summary:
        return query(args, config.db_dir)
    return consume(args, config)


if __name__ == "__main__":
    cli.run(main)
