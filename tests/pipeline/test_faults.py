"""Fault scenarios on the whole pipeline, each on Kafka (Tansu) and Pub/Sub (emulator).

Every scenario ends with the invariant checker: 0 lost, 0 duplicated rows, 0 unexpected ids.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest

from MessageBroker.message_broker_factory import MessageBrokerFactory
from Pipeline.checker import check, read_jsonl
from Pipeline.events import ResultEvent
from Queue import queue_status
from tests.pipeline.helpers import digit_pngs, send, start_pipeline, wait_for, wait_until

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def results_so_far(stages) -> int:
    return len(read_jsonl(stages.db_dir / "results.jsonl"))


def test_broker_hung_then_resumed_everything_drains(stages, local_broker, tmp_path):
    start_pipeline(stages)
    manifest = tmp_path / "manifest.jsonl"
    send(stages, "--count", "600", manifest=manifest)
    wait_until(lambda: results_so_far(stages) >= 50, 120, "first results")
    os.killpg(local_broker.pid, signal.SIGSTOP)
    try:
        time.sleep(30)  # the broker hangs; every stage must wait, not crash
        for name, process in stages.processes.items():
            assert process.poll() is None, f"{name} died while the broker hung:\n{stages.log_tail(name)}"
    finally:
        os.killpg(local_broker.pid, signal.SIGCONT)
    report = wait_for(stages, [manifest], timeout=300)
    assert report.ok and report.results == 600, report.summary()


@pytest.mark.parametrize("victim", ["sub", "pub", "app_2"])
def test_sigterm_mid_batch_exits_quickly_and_restart_continues(stages, tmp_path, victim):
    start_pipeline(stages)
    manifest = tmp_path / "manifest.jsonl"
    sender = stages.start("app_1", "app_1", "--count", "1200", "--rate", "400", "--manifest", str(manifest))
    wait_until(lambda: results_so_far(stages) >= 100, 120, "first results")
    started = time.monotonic()
    code = stages.stop(victim, sig=signal.SIGTERM, timeout=30)
    took = time.monotonic() - started
    assert code == 0, stages.log_tail(victim)
    assert took < 10, f"{victim} took {took:.1f} s to stop"
    stages.start(victim, victim)
    assert sender.wait(timeout=300) == 0
    stages.processes.pop("app_1")
    report = wait_for(stages, [manifest])
    assert report.ok and report.results == 1200, report.summary()


def test_three_model_servers_kill_one_start_another(stages, tmp_path):
    stages.start("app_2", "app_2")
    for n in range(3):
        queue = str(tmp_path / f"queue{n}")
        stages.start(f"sub{n}", "sub", "--queue-dir", queue)
        stages.start(f"pub{n}", "pub", "--queue-dir", queue)
    manifest = tmp_path / "manifest.jsonl"
    sender = stages.start("app_1", "app_1", "--count", "2000", "--rate", "100", "--manifest", str(manifest))
    wait_until(lambda: results_so_far(stages) >= 300, 180, "first results")
    stages.stop("sub1", sig=signal.SIGKILL)
    queue = str(tmp_path / "queue3")
    stages.start("sub3", "sub", "--queue-dir", queue)
    stages.start("pub3", "pub", "--queue-dir", queue)
    assert sender.wait(timeout=300) == 0
    stages.processes.pop("app_1")
    report = wait_for(stages, [manifest], timeout=300)
    assert report.ok and report.results == 2000, report.summary()
    # The new member took over part of the stream (a rebalance happened).
    assert queue_status(tmp_path / "queue3").appended_seq > 0, stages.log_tail("sub3")


def test_handler_slower_than_the_lease(stages, broker_name, tmp_path):
    extra_args: tuple[str, ...] = ()
    if broker_name == "kafka":
        # Scale the lease down: a batch taking longer than max.poll.interval.ms loses its partitions.
        shipped = MessageBrokerFactory.config_path("kafka").read_text()
        config = tmp_path / "kafka_slow.ini"
        config.write_text(re.sub(r"(?m)^max\.poll\.interval\.ms = \d+", "max.poll.interval.ms = 6000", shipped))
        extra_args = ("--broker-config", str(config))
    else:
        shipped = MessageBrokerFactory.config_path("pubsub").read_text()
        config = tmp_path / "pubsub_slow.ini"
        config.write_text(shipped)  # ack deadline 10 s < the 12 s batch: the client must extend leases
        extra_args = ("--broker-config", str(config))
    stages.start("app_2", "app_2")
    stages.start("pub", "pub")
    stages.start("sub", "sub", *extra_args, "--batch-size", "50",
                 env={"PIPELINE_FAILPOINTS": "predict_delay_ms=12000;predict_delay_batches=2"})
    manifest = tmp_path / "manifest.jsonl"
    send(stages, "--count", "300", manifest=manifest)
    report = wait_for(stages, [manifest], timeout=400)
    assert report.ok and report.results == 300, report.summary()


def test_model_failing_on_some_inputs_dead_letters_them_and_continues(stages, tmp_path):
    stages.start("app_2", "app_2")
    stages.start("pub", "pub")
    stages.start("sub", "sub", "--max-attempts", "3", env={"PIPELINE_FAILPOINTS": "predict_fail_marker=POISON"})
    good = digit_pngs(tmp_path / "good", 30)
    poisoned = digit_pngs(tmp_path / "poison", 2, offset=100, text="POISON")
    manifest = tmp_path / "manifest.jsonl"
    send(stages, *map(str, good[:15] + poisoned + good[15:]), manifest=manifest)
    report = wait_for(stages, [manifest], timeout=300)
    assert report.ok and (report.results, report.dead_letters) == (30, 2), report.summary()
    letters = read_jsonl(stages.db_dir / "dead_letters.jsonl")
    assert all("injected model failure" in row["reason"] and row["attempts"] == 3 for row in letters), letters


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_model_fails_clearly_and_consumes_nothing(stages, tmp_path, damage):
    checkpoint = tmp_path / "model.h5"
    if damage == "corrupt":
        checkpoint.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4000))
    stages.start("app_2", "app_2")
    stages.start("pub", "pub")
    manifest = tmp_path / "manifest.jsonl"
    send(stages, "--count", "50", manifest=manifest)
    failed = stages.run("sub", "--checkpoint", str(checkpoint), timeout=120)
    assert failed.returncode == 2
    assert str(checkpoint) in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    stages.start("sub", "sub")  # the real model: every image is still there to be served
    report = wait_for(stages, [manifest])
    assert report.ok and report.results == 50, report.summary()


def test_queue_full_holds_back_then_recovers(stages, tmp_path):
    stages.start("app_2", "app_2")
    manifest = tmp_path / "manifest.jsonl"
    send(stages, "--count", "400", manifest=manifest)
    # The images wait on the topic, so the first micro-batch (256 results, ~100 kB) is larger
    # than the whole cap: it must go in part by part, not be refused forever.
    stages.start("sub", "sub", env={"PIPELINE_QUEUE_MAX_BYTES": "60000"})
    # No publisher yet: the queue fills to its cap, and the model server must wait, not drop.
    wait_until(lambda: "queue refused" in stages.log_tail("sub", 20000), 120, "the queue to fill")
    assert results_so_far(stages) == 0
    stages.start("pub", "pub")
    report = wait_for(stages, [manifest])
    assert report.ok and report.results == 400 and report.dead_letters == 0, report.summary()


def test_db_full_holds_back_then_recovers(stages, tmp_path):
    stages.start("sub", "sub")
    stages.start("pub", "pub")
    manifest = tmp_path / "manifest.jsonl"
    send(stages, "--count", "300", manifest=manifest)
    # All 300 results wait on the topic first, so app_2's first batch is larger than the
    # whole cap (~45 rows): it must store what fits, not refuse the batch forever.
    wait_until(lambda: queue_status(stages.queue_dir).acked_seq >= 300, 120, "all results to be published")
    stages.start("app_2", "app_2", env={"PIPELINE_DB_MAX_BYTES": "20000"})
    wait_until(lambda: "DB refused" in stages.log_tail("app_2", 20000), 120, "the DB to fill")
    stored = results_so_far(stages)
    assert 0 < stored < 300
    stages.stop("app_2")
    stages.start("app_2", "app_2")  # space is back (no cap)
    report = wait_for(stages, [manifest])
    assert report.ok and report.results == 300 and report.dead_letters == 0, report.summary()


def test_duplicates_out_of_order_redeliveries_and_replays(stages, local_broker, broker_name, tmp_path):
    start_pipeline(stages)
    manifest = tmp_path / "manifest.jsonl"
    send(stages, "--count", "200", manifest=manifest)
    image = digit_pngs(tmp_path / "same", 1)[0]
    for _ in range(3):  # the same input several times
        send(stages, "--id-from-content", str(image), manifest=manifest)
    report = wait_for(stages, [manifest])
    assert report.ok and report.results == 201, report.summary()
    # Replay every stored result twice, shuffled, straight onto the results topic.
    rows = read_jsonl(stages.db_dir / "results.jsonl")
    replays = [ResultEvent.from_json(json.dumps(row).encode()).to_message() for row in rows] * 2
    random.Random(7).shuffle(replays)
    broker = MessageBrokerFactory.create(broker_name, overrides=_overrides(broker_name, local_broker.env))
    try:
        broker.publish_batch(stages.env["PIPELINE_RESULTS_TOPIC"], replays)
    finally:
        broker.close()
    time.sleep(15)  # app_2 consumes the replays; it logs its totals when stopped
    assert stages.stop("app_2") == 0
    skipped = int(re.search(r"\((\d+) duplicates skipped\)", stages.log_tail("app_2", 20000)).group(1))
    assert skipped >= len(replays)
    report = check([manifest], stages.db_dir)
    assert report.ok and report.results == 201 and len(read_jsonl(stages.db_dir / "results.jsonl")) == 201


def _overrides(broker_name: str, env: dict[str, str]) -> dict[tuple[str, str], str]:
    if broker_name == "kafka":
        return {("kafka", "bootstrap.servers"): env["KAFKA_BOOTSTRAP_SERVERS"]}
    return {("pubsub", "emulator_host"): env["PUBSUB_EMULATOR_HOST"], ("pubsub", "project_id"): env["PUBSUB_PROJECT_ID"]}
