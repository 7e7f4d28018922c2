"""cloud_coordinator.ingest against every DeviceStore: what is applied, what is counted why."""

from __future__ import annotations

import logging
import random

import msgpack
import pytest

from cloud_coordinator.ingest import SUBSCRIBED, Ingest
from protocols import wire
from protocols.messages import OFFLINE, encode
from protocols.topics import DeviceChannel, JobChannel, device_topic, job_topic
from tests.unit import builders
from tests.unit.fakes import InspectableStore

MAX = 64 * 1024
STATUS = device_topic("dev-1", DeviceChannel.STATUS)
TELEMETRY = device_topic("dev-1", DeviceChannel.TELEMETRY)
ACK = device_topic("dev-1", DeviceChannel.ACK)
GOOD_STATUS = encode(builders.status("dev-1", ts=100.0))


def status_map(**fields: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "kind": "status",
        "device_id": "dev-1",
        "state": "online",
        "ts": 1.0,
    }
    base.update(fields)
    return wire.pack_map(base)


@pytest.fixture
def ingest(store: InspectableStore) -> Ingest:
    return Ingest(store, MAX)


# --- accepted ---------------------------------------------------------------------------


def test_a_valid_status_is_applied(ingest: Ingest, store: InspectableStore) -> None:
    assert ingest.handle(STATUS, GOOD_STATUS, now=10.0) is True
    [device] = store.devices()
    assert (device.device_id, device.online, device.last_seen) == ("dev-1", True, 10.0)
    assert ingest.accepted == {"status": 1}
    assert ingest.rejected == {}
    assert store.rejections() == {}


def test_valid_telemetry_is_applied(ingest: Ingest, store: InspectableStore) -> None:
    payload = encode(builders.telemetry("dev-1", seq=9, cpu_percent=42.0))
    assert ingest.handle(TELEMETRY, payload, now=10.0) is True
    [device] = store.devices()
    assert device.telemetry is not None
    assert (device.telemetry["seq"], device.telemetry["cpu_percent"]) == (9, 42.0)
    assert ingest.accepted == {"telemetry": 1}


def test_a_valid_ack_marks_the_device_as_heard_from(
    ingest: Ingest, store: InspectableStore
) -> None:
    assert ingest.handle(ACK, encode(builders.ack("cmd-7", ok=False, reason="busy")), 10.0)
    [device] = store.devices()
    assert (device.device_id, device.last_seen, device.online) == ("dev-1", 10.0, False)
    assert ingest.accepted == {"ack": 1}


def test_accepted_counters_count_per_channel(ingest: Ingest) -> None:
    ingest.handle(STATUS, GOOD_STATUS, 1.0)
    ingest.handle(STATUS, GOOD_STATUS, 2.0)  # retained replay of the same session
    for seq in range(3):
        ingest.handle(TELEMETRY, encode(builders.telemetry("dev-1", seq=seq)), 3.0)
    ingest.handle(ACK, encode(builders.ack()), 4.0)
    assert ingest.accepted == {"status": 2, "telemetry": 3, "ack": 1}


def test_a_newer_session_applies_after_an_older_one(
    ingest: Ingest, store: InspectableStore
) -> None:
    ingest.handle(STATUS, encode(builders.status("dev-1", OFFLINE, ts=100.0)), 1.0)
    assert ingest.handle(STATUS, encode(builders.status("dev-1", ts=200.0)), 2.0)
    assert store.devices()[0].online is True


def test_the_subscribed_channels_are_the_handled_ones() -> None:
    registry_channels = {DeviceChannel.STATUS, DeviceChannel.TELEMETRY, DeviceChannel.ACK}
    training_channels = {DeviceChannel.UPDATE, DeviceChannel.BLOB_REQUEST}
    inference_channels = {DeviceChannel.INFER_REQUEST}
    assert set(SUBSCRIBED) == registry_channels | training_channels | inference_channels


# --- rejected ---------------------------------------------------------------------------

REJECTIONS = [
    pytest.param(STATUS, b"\xc1\xc1\xc1", "status", "malformed", id="garbage"),
    pytest.param(STATUS, b"", "status", "malformed", id="empty"),
    pytest.param(STATUS, GOOD_STATUS[:-3], "status", "malformed", id="truncated"),
    pytest.param(STATUS, msgpack.packb([1, 2, 3]), "status", "malformed", id="not-a-map"),
    pytest.param(
        TELEMETRY, encode(builders.telemetry())[:10], "telemetry", "malformed", id="truncated-tm"
    ),
    pytest.param(STATUS, encode(builders.telemetry()), "status", "wrong_kind", id="wrong-kind"),
    pytest.param(TELEMETRY, GOOD_STATUS, "telemetry", "wrong_kind", id="status-on-telemetry"),
    pytest.param(ACK, GOOD_STATUS, "ack", "wrong_kind", id="status-on-ack"),
    pytest.param(STATUS, status_map(kind="gossip"), "status", "unknown_kind", id="unknown-kind"),
    pytest.param(STATUS, status_map(v=2), "status", "version", id="major-version-2"),
    pytest.param(STATUS, status_map(v=0), "status", "version", id="major-version-0"),
    pytest.param(STATUS, status_map(state="away"), "status", "bad_field", id="bad-state"),
    pytest.param(STATUS, status_map(ts="now"), "status", "bad_field", id="bad-ts"),
    pytest.param(
        STATUS,
        wire.pack_map({"v": 1, "kind": "status", "device_id": "dev-1"}),
        "status",
        "missing_field",
        id="missing-field",
    ),
    pytest.param(
        STATUS,
        encode(builders.status("dev-2")),
        "status",
        "device_mismatch",
        id="status-names-another-device",
    ),
    pytest.param(
        TELEMETRY,
        encode(builders.telemetry("dev-2")),
        "telemetry",
        "device_mismatch",
        id="telemetry-names-another-device",
    ),
    pytest.param(
        device_topic("dev-1", DeviceChannel.UPDATE),
        b"anything",
        "update",
        "unsupported",
        id="update-channel",
    ),
    pytest.param(
        device_topic("dev-1", DeviceChannel.CMD),
        GOOD_STATUS,
        "cmd",
        "unsupported",
        id="cmd-channel",
    ),
    pytest.param(
        job_topic("job-1", JobChannel.TASK), GOOD_STATUS, "unknown", "topic", id="job-topic"
    ),
    pytest.param("fedge/v1/dev/dev-1/gossip", GOOD_STATUS, "unknown", "topic", id="bad-channel"),
    pytest.param("fedge/v1/dev/a b/status", GOOD_STATUS, "unknown", "topic", id="bad-device-id"),
    pytest.param("fedge/v2/dev/dev-1/status", GOOD_STATUS, "unknown", "topic", id="other-root"),
    pytest.param("$SYS/broker/uptime", b"12 seconds", "unknown", "topic", id="sys-topic"),
]


@pytest.mark.parametrize(("topic", "payload", "channel", "reason"), REJECTIONS)
def test_bad_messages_are_counted_by_reason_and_never_raise(
    ingest: Ingest,
    store: InspectableStore,
    topic: str,
    payload: bytes,
    channel: str,
    reason: str,
) -> None:
    assert ingest.handle(topic, payload, now=10.0) is False
    assert ingest.rejected == {(channel, reason): 1}
    assert store.rejections() == {(channel, reason): 1}
    assert ingest.accepted == {}
    assert store.devices() == []


def test_a_stale_status_is_rejected_and_does_not_change_presence(
    ingest: Ingest, store: InspectableStore
) -> None:
    assert ingest.handle(STATUS, encode(builders.status("dev-1", ts=200.0)), 1.0)
    late_will = encode(builders.status("dev-1", OFFLINE, ts=100.0, reason="will"))
    assert ingest.handle(STATUS, late_will, 2.0) is False
    assert ingest.rejected == {("status", "stale"): 1}
    assert store.rejections() == {("status", "stale"): 1}
    assert ingest.accepted == {"status": 1}
    [device] = store.devices()
    assert device.online is True
    assert device.status_changed == 1.0


def test_a_payload_over_the_cap_is_rejected_as_too_large(store: InspectableStore) -> None:
    small = Ingest(store, max_payload_bytes=64)
    payload = encode(builders.telemetry("dev-1", extra={f"k{i}": 1.0 for i in range(20)}))
    assert len(payload) > 64
    assert small.handle(TELEMETRY, payload, 1.0) is False
    assert small.rejected == {("telemetry", "too_large"): 1}


def test_a_mismatched_payload_leaves_both_devices_alone(
    ingest: Ingest, store: InspectableStore
) -> None:
    ingest.handle(device_topic("dev-2", DeviceChannel.STATUS), encode(builders.status("dev-2")), 1)
    forged = encode(builders.status("dev-2", OFFLINE, ts=999.0))
    assert ingest.handle(STATUS, forged, 2.0) is False
    assert [(d.device_id, d.online) for d in store.devices()] == [("dev-2", True)]


def test_rejection_counters_accumulate(ingest: Ingest, store: InspectableStore) -> None:
    for _ in range(3):
        ingest.handle(STATUS, b"\xc1", 1.0)
    ingest.handle(TELEMETRY, b"\xc1", 1.0)
    ingest.handle(STATUS, encode(builders.status("dev-9")), 1.0)
    expected = {
        ("status", "malformed"): 3,
        ("telemetry", "malformed"): 1,
        ("status", "device_mismatch"): 1,
    }
    assert ingest.rejected == expected
    assert store.rejections() == expected


def test_random_bytes_on_every_channel_never_raise(ingest: Ingest, store: InspectableStore) -> None:
    rng = random.Random(1234)
    valid = [GOOD_STATUS, encode(builders.telemetry()), encode(builders.ack())]
    handled = 0
    for topic in (STATUS, TELEMETRY, ACK):
        for _ in range(150):
            if rng.random() < 0.5:
                payload = rng.randbytes(rng.randrange(0, 64))
            else:  # flip bytes of a valid message
                buf = bytearray(rng.choice(valid))
                for _ in range(rng.randrange(1, 4)):
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
                payload = bytes(buf)
            result = ingest.handle(topic, payload, 1.0)
            assert isinstance(result, bool)
            handled += 1
    assert sum(ingest.accepted.values()) + sum(ingest.rejected.values()) == handled
    assert store.rejections() == dict(sorted(ingest.rejected.items()))


def test_rejections_are_logged_rate_limited(
    ingest: Ingest, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cloud_coordinator.ingest"):
        for _ in range(1000):
            ingest.handle(STATUS, b"\xc1", 1.0)
    warnings = [r for r in caplog.records if r.name == "cloud_coordinator.ingest"]
    assert len(warnings) == 6  # the first 5, then every 1000th
    assert "malformed, #1)" in warnings[0].getMessage()
    assert "malformed, #1000)" in warnings[-1].getMessage()
    assert STATUS in warnings[0].getMessage()
