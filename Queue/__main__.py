"""Command line of the file queue: ``python -m Queue status DIR [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from Queue.errors import QueueError
from Queue.status import QueueStatus, queue_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m Queue",
        description="Inspect a file queue directory (safe while its writer and reader run).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status",
        help="show depth, age of the oldest un-acked record and bytes on disk",
        description="Show depth, age of the oldest un-acked record and bytes on disk.",
    )
    status.add_argument("directory", help="the queue directory (holds *.seg files)")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def format_status(status: QueueStatus) -> str:
    age = "-" if status.oldest_age_seconds is None else f"{status.oldest_age_seconds:.3f} s"
    return "\n".join(
        [
            f"depth:             {status.depth}",
            f"oldest item age:   {age}",
            f"bytes on disk:     {status.bytes_on_disk}",
            f"segments:          {status.segments}",
            f"last appended seq: {status.appended_seq}",
            f"last acked seq:    {status.acked_seq}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = queue_status(args.directory)
    except QueueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status.as_dict()) if args.json else format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
