"""Every MQTT topic string of Fedge: built and parsed here, nowhere else.

Layout (root ``fedge/v1``)::

    fedge/v1/dev/{device}/{status|telemetry|update|ack|blob/req|infer/req}      device -> cloud
    fedge/v1/dev/{device}/{cmd|task|update/ack|blob|infer/resp|deploy}        cloud -> device
    fedge/v1/model/{name}/{manifest|blob}
    fedge/v1/job/{job}/{task|control}

Identifiers are 1-64 characters of ``[A-Za-z0-9_.-]``, so they never contain the MQTT
separators or wildcards and one ACL pattern (``fedge/v1/dev/%u/#``) covers a device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocols.errors import DecodeError

ROOT = "fedge/v1"
_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class DeviceChannel(StrEnum):
    """What a topic under ``dev/{device}/`` carries."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    UPDATE = "update"
    CMD = "cmd"
    ACK = "ack"
    INFER_REQUEST = "infer/req"
    INFER_RESPONSE = "infer/resp"
    TASK = "task"
    UPDATE_ACK = "update/ack"
    BLOB = "blob"
    BLOB_REQUEST = "blob/req"
    DEPLOY = "deploy"  # retained: the signed `Deployment` of the version to serve


class ModelChannel(StrEnum):
    """What a topic under ``model/{name}/`` carries."""

    MANIFEST = "manifest"
    BLOB = "blob"


class JobChannel(StrEnum):
    """What a topic under ``job/{job}/`` carries."""

    TASK = "task"
    CONTROL = "control"


def valid_id(value: str) -> bool:
    """True when `value` may be used as a device, model or job identifier."""
    return _ID_RE.fullmatch(value) is not None


def check_id(value: str, what: str = "identifier") -> str:
    """Return `value` if it is a valid identifier, else raise ValueError saying why."""
    if not valid_id(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
    return value


def device_topic(device_id: str, channel: DeviceChannel) -> str:
    """Topic of `channel` for one device."""
    return f"{ROOT}/dev/{check_id(device_id, 'device id')}/{channel.value}"


def model_topic(name: str, channel: ModelChannel) -> str:
    """Topic of `channel` for one model."""
    return f"{ROOT}/model/{check_id(name, 'model name')}/{channel.value}"


def job_topic(job_id: str, channel: JobChannel) -> str:
    """Topic of `channel` for one job."""
    return f"{ROOT}/job/{check_id(job_id, 'job id')}/{channel.value}"


def all_devices_filter(channel: DeviceChannel) -> str:
    """Subscription filter matching `channel` of every device."""
    return f"{ROOT}/dev/+/{channel.value}"


def device_acl_pattern() -> str:
    """Mosquitto ACL pattern granting a device (username = device id) its own subtree."""
    return f"{ROOT}/dev/%u/#"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed device topic."""

    device_id: str
    channel: DeviceChannel


@dataclass(frozen=True, slots=True)
class ModelTopic:
    """A parsed model topic."""

    name: str
    channel: ModelChannel


@dataclass(frozen=True, slots=True)
class JobTopic:
    """A parsed job topic."""

    job_id: str
    channel: JobChannel


Topic = DeviceTopic | ModelTopic | JobTopic

_DEVICE = {c.value: c for c in DeviceChannel}
_MODEL = {c.value: c for c in ModelChannel}
_JOB = {c.value: c for c in JobChannel}


def parse_topic(topic: str) -> Topic:
    """Parse a Fedge topic string; raise DecodeError (reason ``topic``) for anything else."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise DecodeError(f"topic {topic!r} is outside {ROOT}/", reason="topic")
    parts = topic[len(prefix) :].split("/", 2)
    if len(parts) == 3 and valid_id(parts[1]):
        family, ident, rest = parts
        if family == "dev" and rest in _DEVICE:
            return DeviceTopic(ident, _DEVICE[rest])
        if family == "model" and rest in _MODEL:
            return ModelTopic(ident, _MODEL[rest])
        if family == "job" and rest in _JOB:
            return JobTopic(ident, _JOB[rest])
    raise DecodeError(f"unknown topic {topic!r}", reason="topic")
