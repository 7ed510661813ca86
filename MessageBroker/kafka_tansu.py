"""Workarounds for consumer-group bugs of Tansu, the local Kafka-protocol broker.

On when ``group.leave.settle.ms`` > 0 (the local ``kafka_config.ini`` sets it; a real Apache
Kafka cluster needs none of this). Tansu wedges a group for good when its leader leaves while
the group is (re)forming, until Tansu restarts. So a consumer watches its membership through
librdkafka's statistics, waits until it is settled before leaving, and raises instead of waiting
forever in a group that has stayed unformed for ``_GROUP_WEDGED_AFTER`` seconds.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from MessageBroker.errors import ReceiveError

if TYPE_CHECKING:
    import confluent_kafka

    from MessageBroker.kafka_settings import KafkaSettings

_GROUP_WEDGED_AFTER = 90.0  # a group not formed for this long never will
_STATISTICS_INTERVAL_MS = 200


class TansuGroupGuard:
    """Mixin of the Kafka consumer: membership watching for Tansu mode (see the module docstring)."""

    group: str
    _kafka: confluent_kafka.Consumer
    _settings: KafkaSettings

    def _membership_hooks(self) -> dict[str, Any]:
        """Start watching membership: returns the librdkafka settings that report it to ``_on_statistics``."""
        # Membership as librdkafka last reported it: (when, group state, join state),
        # and since when it has not been settled.
        self._membership: tuple[float, str, str] = (time.monotonic(), "", "")
        self._unsettled_since: float | None = time.monotonic()
        return {"statistics.interval.ms": _STATISTICS_INTERVAL_MS, "stats_cb": self._on_statistics}

    def _on_statistics(self, raw: str) -> None:
        group = json.loads(raw).get("cgrp", {})
        now, join_state = time.monotonic(), group.get("join_state", "")
        self._membership = (now, group.get("state", ""), join_state)
        if join_state == "steady":
            self._unsettled_since = None
        elif self._unsettled_since is None:
            self._unsettled_since = now

    def _check_group_forms(self) -> None:
        """Fail loudly instead of waiting forever in a group Tansu will never form again."""
        unsettled = self._unsettled_since
        if unsettled is not None and time.monotonic() - unsettled > _GROUP_WEDGED_AFTER:
            raise ReceiveError(
                f"group {self.group!r} has not formed for {_GROUP_WEDGED_AFTER:g} s: on Tansu this happens when "
                "the group's leader left while the group was re-forming (a Tansu bug); restart the broker "
                "or use another group name")

    def _settle_before_leaving(self) -> None:
        """Tansu wedges a group for good when its leader leaves while the group is (re)forming.

        So keep heartbeating for ``leave_settle`` (longer than a heartbeat interval: a rebalance
        another member started is noticed) and until librdkafka reports this member settled.
        Messages fetched meanwhile are not committed: the group gets them again. Best effort:
        members of one group closing at the same moment can still race.
        """
        started = time.monotonic()
        settle_from = started + self._settings.leave_settle
        give_up = settle_from + int(self._settings.consumer.get("session.timeout.ms", "45000")) / 1000
        while time.monotonic() < give_up:
            self._kafka.poll(0.1)
            when, state, join_state = self._membership
            if (when >= settle_from and join_state == "steady") or (when > started and state not in ("", "up")):
                return  # settled, or no coordinator to leave anyway
