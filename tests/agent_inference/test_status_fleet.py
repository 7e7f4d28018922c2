"""Every Status the agent sends (online, its Will, the offline on shutdown) names its fleet."""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig
from agent.daemon import Agent
from protocols.messages import OFFLINE, ONLINE, Status, decode_as
from protocols.mqtt import InboundMessage


def test_online_will_and_offline_statuses_carry_the_fleet(tmp_path: Path) -> None:
    config = AgentConfig("cam-3", str(tmp_path), fleet="lab-2", train=False, inference=False)
    agent = Agent(config)
    will = agent.mqtt.settings.will
    assert will is not None
    payloads = (agent._status(ONLINE), will.payload, agent._status(OFFLINE, "shutdown"))
    statuses = [decode_as(Status, p) for p in payloads]
    assert [(s.state, s.fleet) for s in statuses] == [
        ("online", "lab-2"), ("offline", "lab-2"), ("offline", "lab-2"),
    ]  # fmt: skip


def test_refused_messages_reach_telemetry_by_reason(tmp_path: Path) -> None:
    config = AgentConfig("cam-3", str(tmp_path), train=False, inference=False)
    agent = Agent(config)
    for topic, payload in [("fedge/v1/dev/cam-3/blob", b"\x00garbage"),
                           ("fedge/v1/dev/cam-3/cmd", b"\x00garbage"),
                           ("fedge/v1/dev/cam-3/task", b"")]:  # fmt: skip
        agent._on_message(InboundMessage(topic, payload, 1, False))
    extra = agent._extra()
    assert extra["message_rejected_malformed"] == 1.0  # the garbage command
    assert extra["message_rejected_unsupported"] == 2.0  # a chunk and a task, training off
    assert agent.messages_rejected == 3
