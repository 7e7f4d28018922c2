"""``fedge-agent``: the device daemon's command line."""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from agent.errors import AgentError
from protocols import __version__
from protocols.config import (
    EXIT_CONFIG,
    ConfigError,
    as_toml,
    check_broker_files,
    split_host_port,
)
from protocols.logs import add_log_flags, fatal, setup_logging

EPILOG = """\
configuration (later wins): defaults < config file < FEDGE_* environment < flags.
config file: --config, $FEDGE_CONFIG, /etc/fedge/agent.toml, ~/.config/fedge/agent.toml.
environment: FEDGE_DEVICE_ID, FEDGE_MQTT_HOST, FEDGE_MQTT_PORT, FEDGE_MQTT_TLS_CA,
  FEDGE_INFERENCE, FEDGE_INFERENCE_LISTEN, FEDGE_INFERENCE_THREADS, FEDGE_MODEL_KEYS, ...
model signatures: manifests must be signed by a key in model_keys (--model-key); with none
  configured, the first signer met is pinned in <data-dir>/trust/model-keys.
inference API (on unless --no-inference): POST /v1/predict, GET /v1/model, POST /v1/feedback,
  POST /v1/rollback, GET /healthz, GET /metrics, GET /openapi.json; on a Unix socket
  (default <data-dir>/inference.sock) or a loopback HOST:PORT. Python: agent.client.
exit status: 0 clean stop, 78 invalid configuration or state to fix by hand (a bad pinned
  key file), 1 unexpected error.
examples:
  fedge-agent --device-id cam-01 --broker mqtt.example.net:8883   (TLS: set [mqtt] tls_ca)
  fedge-agent --config /etc/fedge/agent.toml --print-config        (what it would run with)
  fedge-agent --no-train --listen 127.0.0.1:8781 --model digits-mlp
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedge-agent",
        description="Fedge edge agent: keeps a device online with the fleet, reports its health, "
        "trains the coordinator's models on local data (training runs in a child process), "
        "and serves predictions with the current model over a local API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fedge-agent {__version__}")
    p.add_argument("--config", metavar="PATH", help="TOML config file")
    p.add_argument("--device-id", metavar="ID", help="this device's id (default: host name)")
    p.add_argument(
        "--fleet", metavar="NAME", help="fleet this device belongs to (default: default)"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the agent keeps its state (default: /var/lib/fedge-agent for root, "
        "else $XDG_DATA_HOME/fedge-agent, i.e. ~/.local/share/fedge-agent)",
    )
    p.add_argument(
        "--dataset-dir",
        metavar="DIR",
        help="local training data: train.npz and val.npz (default: <data-dir>/data)",
    )
    p.add_argument(
        "--no-train",
        dest="train",
        action="store_false",
        default=None,
        help="refuse training tasks (inference and telemetry only)",
    )
    p.add_argument(
        "--no-inference",
        dest="inference",
        action="store_false",
        default=None,
        help="do not serve predictions (no local API, no model loaded for inference)",
    )
    p.add_argument(
        "--listen",
        metavar="ADDR",
        help="inference API address: unix:/PATH or a loopback HOST:PORT "
        "(default: unix:<data-dir>/inference.sock)",
    )
    p.add_argument("--model", metavar="NAME", help="model to serve (default: the first one)")
    p.add_argument(
        "--inference-threads", type=int, metavar="N", help="onnxruntime threads (default 1)"
    )
    p.add_argument(
        "--providers",
        metavar="LIST",
        help="execution providers, best first: cpu, cuda, tensorrt, openvino (default cpu); "
        "unavailable ones are skipped with a warning",
    )
    p.add_argument(
        "--model-key",
        action="append",
        metavar="BASE64",
        help="trust model manifests signed by this Ed25519 public key (`fedge-coordinator "
        "public-key` prints it); repeatable. Default: the model_keys config key, or trust the "
        "first signer met (pinned in <data-dir>/trust/model-keys)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        default=None,
        help="ask the cloud model when a prediction's confidence is below offload_threshold",
    )
    p.add_argument(
        "--broker", metavar="HOST[:PORT]", help="MQTT broker address (default 127.0.0.1:1883)"
    )
    p.add_argument(
        "--keepalive", type=int, metavar="S", help="MQTT keepalive in seconds (default 30)"
    )
    p.add_argument(
        "--telemetry-interval", type=float, metavar="S", help="seconds between reports (default 5)"
    )
    add_log_flags(p)
    p.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    return p


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    mqtt: dict[str, Any] = {}
    for key in (
        "device_id",
        "fleet",
        "data_dir",
        "dataset_dir",
        "train",
        "inference",
        "log_level",
        "log_format",
    ):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    if args.telemetry_interval is not None:
        flags["telemetry_interval_s"] = args.telemetry_interval
    for flag, key in (
        ("listen", "inference_listen"),
        ("model", "inference_model"),
        ("inference_threads", "inference_threads"),
        ("providers", "inference_providers"),
    ):
        if getattr(args, flag) is not None:
            flags[key] = getattr(args, flag)
    if args.model_key:
        flags["model_keys"] = ",".join(args.model_key)
    if args.offload is not None:
        flags["offload"] = args.offload
    if args.broker:
        host, port = split_host_port(args.broker, "--broker")
        mqtt["host"] = host
        if port is not None:
            mqtt["port"] = port
    if args.keepalive is not None:
        mqtt["keepalive"] = args.keepalive
    if mqtt:
        flags["mqtt"] = mqtt
    return flags


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT; return its exit status."""
    args = _parser().parse_args(argv)
    from agent.config import load_config  # after argparse, so --help stays instant

    try:
        config = load_config(_flags(args), os.environ, args.config)
        if not args.print_config:
            check_broker_files(config.mqtt)
            from protocols.mqtt import check_tls_files  # (paho: not for --print-config)

            check_tls_files(config.mqtt)
    except ConfigError as exc:
        fatal(f"fedge-agent: invalid configuration: {exc}")
        return EXIT_CONFIG
    if args.print_config:
        sys.stdout.write(as_toml(config))
        return 0
    setup_logging(config.log_level, config.log_format, "fedge-agent")
    from agent.daemon import Agent

    try:
        agent = Agent(config)
    except AgentError as exc:  # state on disk a person must fix (a bad pinned key file)
        fatal(f"fedge-agent: cannot start: {exc}")
        return EXIT_CONFIG
    except (OSError, sqlite3.Error) as exc:  # a data directory it cannot create or write
        why = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) else str(exc)
        fatal(f"fedge-agent: cannot start: {why} (data_dir is {config.data_dir})")
        return EXIT_CONFIG
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.request_stop())
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
