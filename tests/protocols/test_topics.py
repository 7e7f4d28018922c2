"""Topic builders and `parse_topic`: round trips for every channel, rejection of the rest."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

import pytest

from protocols import topics
from protocols.errors import DecodeError
from protocols.topics import (
    DeviceChannel,
    DeviceTopic,
    JobChannel,
    JobTopic,
    ModelChannel,
    ModelTopic,
    device_topic,
    job_topic,
    model_topic,
    parse_topic,
)

IDS = ["cam-01", "a", "A_b.c-9", "x" * 64, "..", "0"]
BAD_IDS = ["", "+", "#", "a/b", "a+", "dev#1", "x" * 65, "a b", "é", "a\n", "$SYS", "a\x00"]


@pytest.mark.parametrize("channel", list(DeviceChannel))
@pytest.mark.parametrize("ident", IDS)
def test_device_topic_round_trip(channel: DeviceChannel, ident: str) -> None:
    topic = device_topic(ident, channel)
    assert topic == f"fedge/v1/dev/{ident}/{channel.value}"
    assert parse_topic(topic) == DeviceTopic(ident, channel)


@pytest.mark.parametrize("channel", list(ModelChannel))
@pytest.mark.parametrize("ident", IDS)
def test_model_topic_round_trip(channel: ModelChannel, ident: str) -> None:
    topic = model_topic(ident, channel)
    assert topic == f"fedge/v1/model/{ident}/{channel.value}"
    assert parse_topic(topic) == ModelTopic(ident, channel)


@pytest.mark.parametrize("channel", list(JobChannel))
@pytest.mark.parametrize("ident", IDS)
def test_job_topic_round_trip(channel: JobChannel, ident: str) -> None:
    topic = job_topic(ident, channel)
    assert topic == f"fedge/v1/job/{ident}/{channel.value}"
    assert parse_topic(topic) == JobTopic(ident, channel)


def test_parsed_channels_are_the_enum_members() -> None:
    parsed = parse_topic(device_topic("d", DeviceChannel.INFER_REQUEST))
    assert isinstance(parsed, DeviceTopic)
    assert parsed.channel is DeviceChannel.INFER_REQUEST


BUILDERS: list[tuple[Callable[[str, Any], str], StrEnum]] = [
    (device_topic, DeviceChannel.STATUS),
    (model_topic, ModelChannel.MANIFEST),
    (job_topic, JobChannel.TASK),
]


@pytest.mark.parametrize("ident", BAD_IDS)
@pytest.mark.parametrize(("builder", "channel"), BUILDERS)
def test_builders_reject_invalid_ids(
    builder: Callable[[str, Any], str], channel: StrEnum, ident: str
) -> None:
    with pytest.raises(ValueError, match="invalid"):
        builder(ident, channel)


@pytest.mark.parametrize("ident", IDS)
def test_valid_ids(ident: str) -> None:
    assert topics.valid_id(ident)
    assert topics.check_id(ident) == ident


@pytest.mark.parametrize("ident", BAD_IDS)
def test_invalid_ids(ident: str) -> None:
    assert not topics.valid_id(ident)
    with pytest.raises(ValueError, match="device id"):
        topics.check_id(ident, "device id")


FOREIGN = [
    "",
    "/",
    "fedge",
    "fedge/v1",
    "fedge/v1/",
    "fedge/v2/dev/cam-01/status",
    "Fedge/v1/dev/cam-01/status",
    "/fedge/v1/dev/cam-01/status",
    "other/v1/dev/cam-01/status",
    "$SYS/broker/uptime",
    "fedge/v1/dev/cam-01",
    "fedge/v1/dev/cam-01/",
    "fedge/v1/dev/cam-01/status/",
    "fedge/v1/dev/cam-01/status/extra",
    "fedge/v1/dev/cam-01/manifest",
    "fedge/v1/dev/cam-01/infer",
    "fedge/v1/dev/cam-01/infer/",
    "fedge/v1/dev/cam-01/infer/other",
    "fedge/v1/dev//status",
    "fedge/v1/dev/+/status",
    "fedge/v1/dev/#",
    "fedge/v1/dev/cam-01/#",
    "fedge/v1/dev/cam+01/status",
    "fedge/v1/dev/cam#01/status",
    "fedge/v1/dev/" + "x" * 65 + "/status",
    "fedge/v1/dev/cam 01/status",
    "fedge/v1/model/detector/task",
    "fedge/v1/model/detector/status",
    "fedge/v1/job/job-1/manifest",
    "fedge/v1/job/job-1/status",
    "fedge/v1/fleet/x/status",
    "fedge/v1/DEV/cam-01/status",
    "fedge/v1/dev/cam-01/STATUS",
    "fedge/v1//cam-01/status",
]


@pytest.mark.parametrize("topic", FOREIGN)
def test_parse_rejects_foreign_and_malformed_topics(topic: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_topic(topic)
    assert info.value.reason == "topic"


@pytest.mark.parametrize("ident", BAD_IDS)
@pytest.mark.parametrize("family", ["dev", "model", "job"])
def test_parse_rejects_invalid_ids(family: str, ident: str) -> None:
    rest = {"dev": "status", "model": "manifest", "job": "task"}[family]
    with pytest.raises(DecodeError) as info:
        parse_topic(f"fedge/v1/{family}/{ident}/{rest}")
    assert info.value.reason == "topic"


def test_filters_and_acl_pattern() -> None:
    assert topics.all_devices_filter(DeviceChannel.TELEMETRY) == "fedge/v1/dev/+/telemetry"
    assert topics.device_acl_pattern() == "fedge/v1/dev/%u/#"
    # Every device topic falls under the ACL pattern once %u is the device id.
    prefix = topics.device_acl_pattern().replace("%u", "cam-01").removesuffix("#")
    for channel in DeviceChannel:
        assert device_topic("cam-01", channel).startswith(prefix)
