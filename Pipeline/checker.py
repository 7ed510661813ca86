"""Invariant checker: what app_1.py sent (its manifest) against what reached the DB.

Reports in the vocabulary of Jepsen's Kafka checker: **lost** (sent, confirmed, but neither a
result row nor a dead letter), **duplicated** rows (one image id stored more than once),
**unexpected** ids (stored but never sent). Images whose publish was not confirmed are
**indeterminate**: they may or may not arrive, and neither outcome is an error. The pipeline promises no order between images, so
no order check applies. Invariant after every run: sent = result rows + dead letters, 0 lost,
0 duplicated.

    python -m Pipeline.checker --manifest run/manifest.jsonl --db-dir DB/data [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from DB.result_store import DEAD_LETTERS_FILE, RESULTS_FILE


@dataclass
class CheckReport:
    sent: int
    results: int
    dead_letters: int
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    indeterminate: int = 0
    labelled: int = 0
    correct: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def summary(self) -> str:
        accuracy = f"{self.accuracy:.2%} of {self.labelled} labelled" if self.labelled else "n/a"
        return (f"sent {self.sent} | results {self.results} | dead letters {self.dead_letters} | "
                f"lost {len(self.lost)} | indeterminate {self.indeterminate} | duplicated rows {len(self.duplicated)} | unexpected {len(self.unexpected)} | "
                f"accuracy {accuracy} | {'OK' if self.ok else 'INVARIANT BROKEN'}")


def read_jsonl(path: Path) -> list[dict]:  # type: ignore[type-arg]
    """Whole JSON lines of a file (a torn last line from a crash is ignored); [] if missing."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def check(manifests: Iterable[Path], db_dir: Path) -> CheckReport:
    """Compare manifests with the DB directory's result and dead-letter files."""
    sent: dict[str, int | None] = {}
    unconfirmed: set[str] = set()
    for manifest in manifests:
        for row in read_jsonl(Path(manifest)):
            if row.get("confirmed", True):
                sent[str(row["image_id"])] = row.get("expected_label")
            else:
                unconfirmed.add(str(row["image_id"]))
    unconfirmed -= set(sent)
    results = read_jsonl(Path(db_dir) / RESULTS_FILE)
    letters = read_jsonl(Path(db_dir) / DEAD_LETTERS_FILE)
    result_counts = collections.Counter(str(r["image_id"]) for r in results)
    letter_ids = {str(r["id"]) for r in letters}
    labels = {str(r["image_id"]): r.get("label") for r in results}
    report = CheckReport(sent=len(sent), results=len(result_counts),
                         dead_letters=len(letter_ids), indeterminate=len(unconfirmed))
    report.lost = sorted(i for i in sent if i not in result_counts and i not in letter_ids)
    report.duplicated = {i: n for i, n in result_counts.items() if n > 1}
    report.unexpected = sorted((set(result_counts) | letter_ids) - set(sent) - unconfirmed)
    for image_id, expected in sent.items():
        if expected is not None and image_id in labels:
            report.labelled += 1
            report.correct += int(labels[image_id] == expected)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check sent images against stored results (lost, duplicated, unexpected).")
    parser.add_argument("--manifest", type=Path, action="append", required=True,
                        help="manifest written by app_1.py --manifest (repeatable)")
    parser.add_argument("--db-dir", type=Path, required=True, help="app_2.py's DB directory")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args(argv)
    report = check(args.manifest, args.db_dir)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok, "accuracy": report.accuracy}, indent=2))
    else:
        print(report.summary())
        for name in ("lost", "unexpected"):
            if getattr(report, name):
                print(f"{name}: {', '.join(getattr(report, name)[:20])}")
        if report.duplicated:
            print(f"duplicated: {dict(list(report.duplicated.items())[:20])}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
