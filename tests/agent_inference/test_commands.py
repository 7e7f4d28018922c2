"""Commands run once each, and only while fresh: `agent.commands` and the daemon's use of it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent import commands
from agent.commands import CommandLog, refusal
from agent.config import AgentConfig
from agent.daemon import Agent
from protocols.messages import Ack, Command, decode_as, encode
from protocols.mqtt import InboundMessage

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("ts", "ttl", "why"),
    [
        (NOW - 120, 60, "expired"),
        (NOW + 86400 * 365, 60, "from the future"),
        (NOW - 10 * 365 * 86400, -1, "invalid"),
    ],
)  # fmt: skip  (NaN and Inf are refused at decode: tests/protocols/test_message_bounds.py)
def test_stale_future_and_malformed_commands_are_refused(ts: float, ttl: float, why: str) -> None:
    reason = refusal(Command("c1", "ping", ts, ttl_s=ttl), NOW)
    assert reason is not None
    assert why in reason


@pytest.mark.parametrize(("ts", "ttl"), [(NOW - 30, 60), (NOW - 10**6, 0), (NOW + 60, 0)])
def test_fresh_commands_pass(ts: float, ttl: float) -> None:
    assert refusal(Command("c1", "ping", ts, ttl_s=ttl), NOW) is None  # (0: no expiry)


def test_the_log_remembers_ids_across_restarts_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "commands.seen"
    log = CommandLog(path, keep=4)
    for n in range(11):
        log.add(f"cmd-{n}")
    again = CommandLog(path, keep=4)  # a restart
    assert [again.seen(f"cmd-{n}") for n in range(11)] == [False] * 7 + [True] * 4
    assert len(path.read_text().split()) <= 2 * 4  # compacted as it grows


def test_a_damaged_log_is_read_for_what_it_still_holds(tmp_path: Path) -> None:
    path = tmp_path / "commands.seen"
    path.write_bytes(b"cmd-1\n\xff\xfe garbage \x00\ncmd-2\n")
    log = CommandLog(path, keep=4)  # (it used to stop the agent at start)
    assert log.seen("cmd-1")
    assert log.seen("cmd-2")
    log.add("cmd-3")
    assert CommandLog(path, keep=4).seen("cmd-3")


def test_command_ids_are_identifiers() -> None:
    with pytest.raises(ValueError, match="cmd_id"):
        Command("two words\n", "ping", NOW)


class _Inference:
    """Counts rollbacks (the daemon's `inference`)."""

    def __init__(self) -> None:
        self.rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1

    def telemetry_extra(self) -> dict[str, float]:
        return {}

    def served_versions(self) -> dict[str, str]:
        return {}


class _Wire:
    def __init__(self) -> None:
        self.acks: list[Ack] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, **kw: Any) -> None:
        if topic.endswith("/ack"):
            self.acks.append(decode_as(Ack, payload))


def _agent(tmp_path: Path) -> tuple[Agent, _Inference, _Wire]:
    agent = Agent(AgentConfig("cam-3", str(tmp_path), train=False, inference=False))
    inference, wire = _Inference(), _Wire()
    agent.inference = inference  # type: ignore[assignment]
    agent.mqtt = wire  # type: ignore[assignment]
    return agent, inference, wire


def _deliver(agent: Agent, command: Command) -> None:
    agent._on_message(InboundMessage("fedge/v1/dev/cam-3/cmd", encode(command), 1, False))


def test_a_command_delivered_twice_runs_once_even_after_a_restart(tmp_path: Path) -> None:
    agent, inference, wire = _agent(tmp_path)
    rollback = Command("cmd-1", "rollback", time.time(), ttl_s=600)
    _deliver(agent, rollback)
    _deliver(agent, rollback)  # QoS 1: at least once
    assert inference.rollbacks == 1
    assert [(a.ok, a.duplicate) for a in wire.acks] == [(True, False), (True, True)]
    agent, inference, wire = _agent(tmp_path)  # restarted, then the broker sends it again
    _deliver(agent, rollback)
    assert inference.rollbacks == 0
    assert [(a.ok, a.duplicate) for a in wire.acks] == [(True, True)]


def test_a_refused_command_is_judged_again_and_not_remembered(tmp_path: Path) -> None:
    agent, inference, wire = _agent(tmp_path)
    future = Command("cmd-2", "rollback", time.time() + 3600, ttl_s=60)
    _deliver(agent, future)
    assert (wire.acks[-1].ok, inference.rollbacks) == (False, 0)
    assert "from the future" in wire.acks[-1].reason
    assert not agent.commands.seen("cmd-2")
    assert commands.MAX_CLOCK_SKEW_S == 300.0
