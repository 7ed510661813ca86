"""The whole pipeline as real processes on real brokers (Kafka via Tansu, Pub/Sub emulator).

Invariant checked after every run: sent = result rows + dead letters, 0 lost, 0 duplicated rows.
"""

from __future__ import annotations

import signal
import time

import pytest

from Pipeline.checker import check, read_jsonl
from Pipeline.demo import write_broken_samples
from tests.pipeline.helpers import send, start_pipeline, wait_for

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

def test_thousand_images_end_to_end(stages, tmp_path):
    from app_1 import dataset_items
    from Modelling.predict_cnn import Predictor

    start_pipeline(stages)
    manifest = tmp_path / "manifest.jsonl"
    send(stages, "--count", "1000", manifest=manifest)
    report = wait_for(stages, [manifest])
    assert report.ok, report.summary()
    assert report.sent == 1000 and report.results == 1000 and report.dead_letters == 0
    rows = {r["image_id"]: r for r in read_jsonl(stages.db_dir / "results.jsonl")}
    sent = read_jsonl(manifest)
    assert set(rows) == {s["image_id"] for s in sent}
    # Labels equal a direct prediction of the same images, in this process.
    images = {item.name: item.image for item in dataset_items(1000, None, "test", 0)}
    direct = Predictor.load().predict_many([images[s["name"]] for s in sent])
    assert [rows[s["image_id"]]["label"] for s in sent] == [p.label for p in direct]
    assert report.accuracy is not None and report.accuracy > 0.9


def test_same_image_sent_three_times_gives_one_row(stages, tmp_path):
    from app_1 import dataset_items

    start_pipeline(stages)
    image = tmp_path / "digit.png"
    image.write_bytes(next(iter(dataset_items(1, None, "test", 7))).image)
    manifest = tmp_path / "manifest.jsonl"
    for _ in range(3):
        send(stages, "--id-from-content", str(image), manifest=manifest)
    assert len(read_jsonl(manifest)) == 3
    report = wait_for(stages, [manifest])
    time.sleep(3)  # give a would-be duplicate the time to arrive
    report = check([manifest], stages.db_dir)
    assert report.ok and report.sent == 1 and report.results == 1
    assert len(read_jsonl(stages.db_dir / "results.jsonl")) == 1


def test_bad_inputs_become_dead_letters_with_reasons(stages, tmp_path):
    from app_1 import dataset_items

    start_pipeline(stages)
    good = []
    for index, item in enumerate(dataset_items(20, None, "test", 0)):
        good.append(tmp_path / f"good_{index}.png")
        good[-1].write_bytes(item.image)
    bad = write_broken_samples(tmp_path / "broken")
    manifest = tmp_path / "manifest.jsonl"
    send(stages, *map(str, good[:10] + bad + good[10:]), manifest=manifest)
    report = wait_for(stages, [manifest])
    assert report.ok, report.summary()
    assert (report.sent, report.results, report.dead_letters) == (23, 20, 3)
    reasons = {row["reason"] for row in read_jsonl(stages.db_dir / "dead_letters.jsonl")}
    assert len(reasons) == 3 and all(reason.startswith("invalid image:") for reason in reasons), reasons
    query = stages.run("app_2", "--dead-letters")
    assert query.returncode == 0 and query.stdout.count("invalid image") == 3


@pytest.mark.parametrize("victim", ["sub", "pub", "app_2"])
def test_sigkill_a_stage_mid_run_then_restart(stages, tmp_path, victim):
    start_pipeline(stages)
    manifest = tmp_path / "manifest.jsonl"
    script = {"sub": "sub", "pub": "pub", "app_2": "app_2"}[victim]
    sender = stages.start("app_1", "app_1", "--count", "1500", "--rate", "300", "--manifest", str(manifest))
    deadline = time.monotonic() + 120
    while check([manifest], stages.db_dir).results < 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    stages.stop(victim, sig=signal.SIGKILL)
    time.sleep(1)
    stages.start(victim, script)
    assert sender.wait(timeout=300) == 0, stages.log_tail("app_1")
    stages.processes.pop("app_1")
    report = wait_for(stages, [manifest])
    assert report.ok, report.summary()
    assert report.sent == 1500 and report.results == 1500
