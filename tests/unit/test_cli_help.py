"""The defaults each ``--help`` states are the defaults the programs run with."""

from __future__ import annotations

import dataclasses
import re

import pytest

from agent import cli as agent_cli
from agent.config import AgentConfig
from cloud_coordinator import cli as coordinator_cli
from cloud_coordinator.config import CoordinatorConfig
from cloud_coordinator.templates import template_names
from protocols.config import BrokerConfig


def _help_of(parser_help: str, flag: str) -> str:
    """The help text of `flag` in an argparse help page, on one line."""
    lines = parser_help.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag))
    text = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 8) or line.lstrip().startswith("-"):
            break
        text.append(line.strip())
    return " ".join(text)


def _stated_default(parser_help: str, flag: str) -> str:
    match = re.search(r"\(default:? ([^);]+)", _help_of(parser_help, flag))
    assert match, f"{flag} states no default"
    return match.group(1).strip()


def _default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def test_the_agents_help_states_its_real_defaults() -> None:
    text = agent_cli._parser().format_help()
    broker = BrokerConfig()
    assert _stated_default(text, "--broker") == f"{broker.host}:{broker.port}"
    assert _stated_default(text, "--keepalive") == str(broker.keepalive)
    assert float(_stated_default(text, "--telemetry-interval")) == _default(
        AgentConfig, "telemetry_interval_s"
    )
    assert _stated_default(text, "--fleet") == _default(AgentConfig, "fleet")
    assert int(_stated_default(text, "--inference-threads")) == _default(
        AgentConfig, "inference_threads"
    )
    assert _stated_default(text, "--log-level") == _default(AgentConfig, "log_level")
    assert _stated_default(text, "--log-format") == _default(AgentConfig, "log_format")


@pytest.mark.parametrize("app", ["fedge-agent", "fedge-coordinator"])
def test_the_data_dir_help_names_the_default_for_root_and_for_users(app: str) -> None:
    parser = agent_cli._parser() if app == "fedge-agent" else coordinator_cli._parser()
    text = _help_of(parser.format_help(), "--data-dir").replace("- ", "-")
    assert f"/var/lib/{app} for root" in text
    assert f"$XDG_DATA_HOME/{app}" in text


def test_the_coordinators_help_states_its_real_defaults() -> None:
    serve = coordinator_cli._parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    broker = BrokerConfig()
    assert _stated_default(text, "--broker") == f"{broker.host}:{broker.port}"
    http = _stated_default(text, "--http")
    assert (
        http
        == f"{_default(CoordinatorConfig, 'http_host')}:{_default(CoordinatorConfig, 'http_port')}"
    )
    assert _stated_default(text, "--log-level") == _default(CoordinatorConfig, "log_level")


def test_the_demo_lists_every_template() -> None:
    assert template_names() == coordinator_cli.DEMO_TEMPLATES
