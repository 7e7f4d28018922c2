"""The DeviceStore contract: the same tests against the in-memory fake and the SQLite registry."""

from __future__ import annotations

import json

from cloud_coordinator.registry import DeviceRecord
from protocols.messages import OFFLINE, ONLINE
from tests.unit import builders
from tests.unit.fakes import InspectableStore


def only(store: InspectableStore) -> DeviceRecord:
    [device] = store.devices()
    return device


def test_a_new_device_goes_online(store: InspectableStore) -> None:
    assert store.apply_status(builders.status("cam-1", ONLINE, ts=100.0, agent_version="1.0"), 10)
    device = only(store)
    assert device.device_id == "cam-1"
    assert device.online is True
    assert (device.first_seen, device.last_seen, device.status_changed) == (10, 10, 10)
    assert device.agent_version == "1.0"
    assert device.telemetry is None


def test_offline_in_the_same_session_applies_with_its_reason(store: InspectableStore) -> None:
    store.apply_status(builders.status(ts=100.0), 10)
    assert store.apply_status(builders.status(state=OFFLINE, ts=100.0, reason="shutdown"), 20)
    device = only(store)
    assert device.online is False
    assert device.status_reason == "shutdown"
    assert device.status_changed == 20


def test_a_status_from_an_older_session_is_ignored(store: InspectableStore) -> None:
    store.apply_status(builders.status(state=ONLINE, ts=200.0), 10)
    # The Will of the previous session, delivered late: must not mark the device offline.
    assert not store.apply_status(builders.status(state=OFFLINE, ts=100.0, reason="will"), 20)
    device = only(store)
    assert device.online is True
    assert device.status_changed == 10
    assert device.status_reason == ""


def test_a_status_from_a_newer_session_applies(store: InspectableStore) -> None:
    store.apply_status(builders.status(state=OFFLINE, ts=100.0), 10)
    assert store.apply_status(builders.status(state=ONLINE, ts=300.0), 20)
    assert only(store).online is True
    assert only(store).status_changed == 20


def test_status_changed_moves_only_when_state_or_session_changes(store: InspectableStore) -> None:
    store.apply_status(builders.status(state=ONLINE, ts=100.0), 10)
    # Retained replay after a coordinator reconnect: same session, same state.
    assert store.apply_status(builders.status(state=ONLINE, ts=100.0), 50)
    assert only(store).status_changed == 10
    assert only(store).last_seen == 50
    # A new session (the device restarted) while we were away: online again, but new.
    assert store.apply_status(builders.status(state=ONLINE, ts=150.0), 60)
    assert only(store).status_changed == 60
    assert store.apply_status(builders.status(state=OFFLINE, ts=150.0), 70)
    assert only(store).status_changed == 70


def test_agent_version_is_kept_when_a_status_omits_it(store: InspectableStore) -> None:
    store.apply_status(builders.status(ts=100.0, agent_version="2.1"), 10)
    store.apply_status(builders.status(state=OFFLINE, ts=100.0), 20)
    assert only(store).agent_version == "2.1"


def test_record_telemetry_keeps_the_latest(store: InspectableStore) -> None:
    store.record_telemetry(builders.telemetry("cam-1", seq=1, cpu_percent=10.0), 10)
    store.record_telemetry(
        builders.telemetry(
            "cam-1",
            seq=2,
            cpu_percent=55.5,
            model_versions={"digits": "v3"},
            extra={"temp_c": 61.0},
            agent_version="1.4",
        ),
        20,
    )
    device = only(store)
    assert device.telemetry is not None
    assert device.telemetry["seq"] == 2
    assert device.telemetry["cpu_percent"] == 55.5
    assert device.telemetry["mem_rss_bytes"] == 40 * 2**20
    assert device.telemetry["extra.temp_c"] == 61.0
    assert device.model_versions == {"digits": "v3"}
    assert device.agent_version == "1.4"
    assert device.last_seen == 20
    json.dumps(device.as_json())  # JSON-ready


def test_telemetry_does_not_change_presence(store: InspectableStore) -> None:
    store.record_telemetry(builders.telemetry("cam-1"), 10)
    assert only(store).online is False
    store.apply_status(builders.status("cam-1", ts=100.0), 20)
    store.record_telemetry(builders.telemetry("cam-1", seq=2), 30)
    assert only(store).online is True
    assert only(store).status_changed == 20


def test_touch_keeps_first_seen_and_never_moves_last_seen_back(store: InspectableStore) -> None:
    store.touch("cam-1", 50)
    store.touch("cam-1", 80)
    store.touch("cam-1", 60)
    device = only(store)
    assert (device.first_seen, device.last_seen) == (50, 80)
    assert device.online is False


def test_devices_are_listed_by_id(store: InspectableStore) -> None:
    for device_id in ("zeta", "alpha", "mid"):
        store.touch(device_id, 1)
    assert [d.device_id for d in store.devices()] == ["alpha", "mid", "zeta"]


def test_count_rejection_accumulates_per_channel_and_reason(store: InspectableStore) -> None:
    assert store.rejections() == {}
    store.count_rejection("status", "malformed")
    store.count_rejection("status", "malformed")
    store.count_rejection("status", "malformed", 5)
    store.count_rejection("telemetry", "malformed")
    store.count_rejection("status", "stale")
    assert store.rejections() == {
        ("status", "malformed"): 7,
        ("status", "stale"): 1,
        ("telemetry", "malformed"): 1,
    }
    assert store.devices() == []
