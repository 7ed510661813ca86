"""The compact key index of the result store: hash collisions never lose or confuse a row.

A weak hash is injected (``DB.key_index.hash_key`` is read when a store is built) so that
collisions happen on every few keys instead of once in 2**32.
"""

from __future__ import annotations

import json
import os
import random
import tracemalloc
from pathlib import Path

import pytest

from DB import RESULTS_FILE, AddOutcome, ResultReader, ResultStore, key_index
from DB.key_index import NOT_FOUND, KeyIndex, hash_key


def result(image_id: object, label: int = 3, **extra: object) -> dict:
    return {"image_id": image_id, "label": label, "probability": 0.97, **extra}


def three_hashes(key: str) -> int:
    """Every key lands on one of three hashes, the top bit set to use the whole uint64 range."""
    return (1 << 63) | (hash_key(key) % 3)


def thirteen_bits(key: str) -> int:
    """8,192 hashes: a few thousand keys fill the merged arrays, the recent dict and the overflow."""
    return (1 << 63) | (hash_key(key) & 0x1FFF)


def assert_store_holds(view: ResultReader | ResultStore, rows: dict[str, dict], absent: list[object]) -> None:
    assert view.count() == len(rows)
    for image_id, row in rows.items():
        assert view.get(image_id) == row, image_id
        assert view.has(image_id)
    for image_id in absent:
        assert view.get(image_id) is None and not view.has(image_id), image_id


@pytest.mark.timeout(60)
@pytest.mark.parametrize("weak_hash", [three_hashes, thirteen_bits])
def test_colliding_keys_are_each_stored_once_found_and_reindexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weak_hash: object
) -> None:
    monkeypatch.setattr(key_index, "hash_key", weak_hash)
    ids: list[object] = [f"img-{n}" for n in range(6000)] + [7, 70, 700]
    rng = random.Random(3)
    rng.shuffle(ids)
    stored: dict[str, dict] = {}
    with ResultStore(tmp_path) as store:
        for start in range(0, len(ids), 250):
            batch = [result(image_id, label=n % 4) for n, image_id in enumerate(ids[start : start + 250])]
            redelivered = [result(image_id, label=99) for image_id in rng.choices(ids[: start + 1], k=20)]
            repeated = batch[:10]  # the same keys again inside the batch
            outcome = store.add_results(batch + redelivered + repeated)
            new = [row for row in batch if str(row["image_id"]) not in stored]
            assert outcome == AddOutcome(len(new), len(batch) + len(redelivered) + len(repeated) - len(new))
            stored.update((str(row["image_id"]), row) for row in new)
        assert store.add_results([result("7"), result(70), result("img-5", label=99)]) == AddOutcome(0, 3)
        absent = [f"new-{n}" for n in range(300)] + [8, "0070"]
        assert_store_holds(store, stored, absent)
        assert sum(store.label_counts().values()) == len(stored)
        assert store.last(3) == [stored[str(image_id)] for image_id in ids[-3:]]
    lines = [json.loads(line) for line in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert sorted(str(row["image_id"]) for row in lines) == sorted(stored)  # each key once
    with ResultStore(tmp_path) as store:  # re-indexed from the file
        assert_store_holds(store, stored, absent)
        assert store.add_results([result(image_id) for image_id in ids[:500]]) == AddOutcome(0, 500)
        assert store.add_results([result(image_id) for image_id in absent]) == AddOutcome(len(absent), 0)
    with ResultReader(tmp_path) as reader:
        stored.update((str(image_id), result(image_id)) for image_id in absent)
        assert_store_holds(reader, stored, ["still-missing", 9])


@pytest.mark.timeout(30)
def test_a_reader_reindexes_colliding_keys_after_the_writer_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(key_index, "hash_key", three_hashes)
    with ResultStore(tmp_path) as store:
        store.add_results([result(f"a{n}") for n in range(20)])
    size = (tmp_path / RESULTS_FILE).stat().st_size
    with ResultStore(tmp_path) as store:
        store.add_results([result(f"b{n}") for n in range(20)])
    reader = ResultReader(tmp_path)
    assert reader.count() == 40 and reader.has("b3")
    # What a roll-back followed by other writes leaves: the b rows replaced by c rows.
    os.truncate(tmp_path / RESULTS_FILE, size)
    with ResultStore(tmp_path) as store:
        store.add_results([result(f"c{n}", label=5) for n in range(30)])
    expected = {f"a{n}": result(f"a{n}") for n in range(20)}
    expected |= {f"c{n}": result(f"c{n}", label=5) for n in range(30)}
    assert_store_holds(reader, expected, [f"b{n}" for n in range(20)])
    assert reader.label_counts() == {3: 20, 5: 30}
    reader.close()


@pytest.mark.timeout(30)
def test_key_index_merges_in_bulk_and_confirms_every_hash_hit() -> None:
    stored: dict[int, str] = {}
    index = KeyIndex(thirteen_bits)
    keys = [f"k{n}" for n in range(20_000)]
    for start in range(0, len(keys), 700):
        batch = keys[start : start + 700]
        hashes = [index.key_hash(key) for key in batch]
        assert index.find(batch, hashes, stored.get) == [NOT_FOUND] * len(batch)
        positions = range(len(stored), len(stored) + len(batch))
        index.add(batch, hashes, positions)
        stored.update(zip(positions, batch))
    assert len(index) == len(keys)
    assert len(index._hashes) and index._recent and index._overflow, "a part of the index went unused"
    everything = keys + [f"other{n}" for n in range(2000)]
    found = index.find(everything, [index.key_hash(key) for key in everything], stored.get)
    assert found == list(range(len(keys))) + [NOT_FOUND] * 2000
    # A row that cannot be read back confirms nothing.
    assert index.find(keys[:50], [index.key_hash(key) for key in keys[:50]], lambda position: None) == [
        position if keys[position] in index._overflow else NOT_FOUND for position in range(50)
    ]


@pytest.mark.timeout(60)
def test_the_index_holds_under_40_bytes_per_row(tmp_path: Path) -> None:
    rows = 100_000
    with open(tmp_path / RESULTS_FILE, "w") as handle:
        for n in range(rows):
            handle.write(json.dumps(result(f"{n:032x}", label=n % 10)) + "\n")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reader = ResultReader(tmp_path)
        assert reader.count() == rows
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / rows < 40, f"{held / rows:.1f} bytes per row"
    reader.close()


@pytest.mark.timeout(30)
def test_key_index_with_the_real_hash_finds_every_key_after_many_merges() -> None:
    index = KeyIndex()
    keys = [f"{n:032x}" for n in range(60_000)]
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        index.add(batch, [index.key_hash(key) for key in batch], range(start, start + len(batch)))
    assert len(index._hashes) >= 56_000 and not index._overflow
    probe = keys[::7] + ["absent", "0" * 32 + "0"]
    found = index.find(probe, [index.key_hash(key) for key in probe], lambda position: keys[position])
    assert found == list(range(0, len(keys), 7)) + [NOT_FOUND, NOT_FOUND]
