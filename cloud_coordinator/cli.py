"""``fedge-coordinator``: serve the fleet, inspect it, or run the demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloud_coordinator.strategies.catalog import STRATEGY_NAMES
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
config file: --config, $FEDGE_CONFIG, /etc/fedge/coordinator.toml, ~/.config/fedge/coordinator.toml.
environment: FEDGE_<KEY> for a top-level key, FEDGE_<SECTION>_<KEY> for one in a section:
  FEDGE_DATA_DIR, FEDGE_HTTP_HOST, FEDGE_HTTP_PORT, FEDGE_MQTT_HOST, FEDGE_MQTT_PORT,
  FEDGE_MQTT_TLS_CA, FEDGE_AGGREGATION_DEVICE, ...
exit status: 0 ok, 1 error, 78 invalid configuration (or a missing dependency).
examples:
  fedge-coordinator demo --agents 3 --rounds 5    (the product tour, broker included)
  fedge-coordinator serve --broker 127.0.0.1:1883 --http 127.0.0.1:8780
  fedge-coordinator devices --watch 2             (the fleet, refreshed every 2 s)
  fedge-coordinator public-key                    (for the agents' model_keys)
"""


COMMANDS = ("serve", "devices", "rejections", "public-key", "demo")
#: fedge's own top-level packages: a missing module among these is a bug, not a missing extra.
OUR_PACKAGES = frozenset({"agent", "cloud_coordinator", "protocols"})
#: `cloud_coordinator.templates.template_names()`, without importing torch for --help.
DEMO_TEMPLATES = ("digits_cnn", "digits_mlp", "machine_health")


def _common(p: argparse.ArgumentParser, default: object = argparse.SUPPRESS) -> None:
    # Accepted before or after the command; the subcommand's copy must not reset the value.
    p.add_argument("--config", metavar="PATH", default=default, help="TOML config file")
    p.add_argument(
        "--data-dir",
        default=default,
        metavar="DIR",
        help="where the coordinator keeps its state (default: /var/lib/fedge-coordinator for"
        " root, else $XDG_DATA_HOME/fedge-coordinator, i.e. ~/.local/share/fedge-coordinator)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedge-coordinator",
        description="Fedge cloud coordinator: device registry, aggregation, model publishing, API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fedge-coordinator {__version__}")
    _common(p, default=None)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the coordinator (default)")
    _common(serve)
    serve.add_argument(
        "--broker", metavar="HOST[:PORT]", help="MQTT broker address (default 127.0.0.1:1883)"
    )
    serve.add_argument(
        "--http",
        metavar="[HOST:]PORT",
        help="bind the HTTP API here (default 127.0.0.1:8780; a bare port binds 127.0.0.1)",
    )
    add_log_flags(serve)
    serve.add_argument("--print-config", action="store_true", help="print the effective config")
    devices = sub.add_parser("devices", help="print the fleet as a table")
    _common(devices)
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")
    devices.add_argument(
        "--watch", type=_positive_seconds, metavar="S", help="refresh every S seconds (0.1-86400)"
    )
    rejections = sub.add_parser("rejections", help="print counts of rejected messages")
    _common(rejections)
    rejections.add_argument("--json", action="store_true", help="print JSON instead of a table")
    key = sub.add_parser(
        "public-key",
        help="print the public key devices pin to check model signatures",
        description="Print the base64 Ed25519 public key of the coordinator's model-signing"
        " key (made on the coordinator's first start). Give it to agents as"
        " `model_keys` in agent.toml, FEDGE_MODEL_KEYS, or --model-key.",
    )
    _common(key)
    demo = sub.add_parser(
        "demo",
        help="run the product tour on this machine",
        description="Start a broker (unless one is configured), a coordinator and N agents as "
        "separate processes, run a federated job on a skewed split of a data set, and compare "
        "it with centralized training. Ends with a one-line JSON summary.",
    )
    demo.add_argument(
        "--agents", type=_at_least(1), default=10, help="agent processes (default 10)"
    )
    demo.add_argument(
        "--rounds", type=_at_least(0), default=20, help="rounds; 0 = presence only (default 20)"
    )
    demo.add_argument(
        "--template",
        default="digits_mlp",
        metavar="NAME",
        help=f"model template: {', '.join(DEMO_TEMPLATES)} (default digits_mlp)",
    )
    demo.add_argument(
        "--compression", default="f32", choices=["f32", "f16", "bf16", "int8", "topk"],
        help="how devices compress their updates (default f32)",
    )  # fmt: skip
    demo.add_argument(
        "--strategy", default="fedavg", choices=STRATEGY_NAMES, metavar="NAME",
        help=f"aggregation strategy, with its default parameters: {', '.join(STRATEGY_NAMES)}"
        " (default fedavg)",
    )  # fmt: skip
    demo.add_argument(
        "--strategy-param", action="append", default=[], metavar="KEY=VALUE",
        help="a parameter of the strategy, repeatable (e.g. --strategy fedavgm"
        " --strategy-param momentum=0.5, what top-k compression works best with)",
    )  # fmt: skip
    demo.add_argument(
        "--mode", default="sync", choices=["sync", "async"],
        help="sync rounds, or async (FedBuff: a new version each time 4/5 of the agents'"
        " worth of updates are in) (default sync)",
    )  # fmt: skip
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (default 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="data split and model seed (default 0)")
    demo.add_argument(
        "--broker", metavar="HOST[:PORT]", help="use this broker instead of starting one"
    )
    demo.add_argument(
        "--duration", type=float, metavar="S", help="with --rounds 0: stop after S seconds"
    )
    demo.add_argument(
        "--embedded", choices=["auto", "mosquitto", "amqtt"], default="auto",
        help="broker to start when none is configured (auto: mosquitto if installed)",
    )  # fmt: skip
    demo.add_argument(
        "--workdir",
        default="fedge-demo",
        help="state and logs (default ./fedge-demo; an earlier demo's there is replaced)",
    )
    return p


def _key_values(items: list[str], flag: str) -> dict[str, float | int]:
    """``KEY=VALUE`` numbers as a dict; exit 2 (a usage error) naming the bad one."""
    out: dict[str, float | int] = {}
    for item in items:
        key, eq, value = item.partition("=")
        try:
            if not eq or not key.strip():
                raise ValueError
            text = value.strip()
            out[key.strip()] = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            print(f"fedge-coordinator: {flag} {item!r}: use KEY=VALUE with a number",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(2) from None
    return out


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        flags["data_dir"] = args.data_dir
    for key in ("log_level", "log_format"):
        if getattr(args, key, None):
            flags[key] = getattr(args, key)
    if getattr(args, "broker", None):
        host, port = split_host_port(args.broker, "--broker")
        flags["mqtt"] = {"host": host} if port is None else {"host": host, "port": port}
    if getattr(args, "http", None):
        text = args.http
        if text.isdigit() or (text.startswith(":") and text.count(":") == 1):
            text = "127.0.0.1:" + text.lstrip(":")  # `9000`, `:9000`: the loopback address
        host, port = split_host_port(text, "--http", lowest_port=0)
        flags["http_host"] = host
        if port is not None:
            flags["http_port"] = port
    return flags


def _at_least(lowest: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be 0.1-86400 seconds, got {text}")
    return value


def _serve(args: argparse.Namespace, config: Any) -> int:
    if args.print_config:
        sys.stdout.write(as_toml(config))
        return 0
    setup_logging(config.log_level, config.log_format, "fedge-coordinator")
    try:
        from cloud_coordinator.aggregation import AggregationError
        from cloud_coordinator.service import Coordinator
    except ModuleNotFoundError as exc:  # torch & co.: fedge installed without its extra
        if (exc.name or "").partition(".")[0] in OUR_PACKAGES:
            raise  # a broken install of fedge itself, not a missing dependency
        fatal(
            f"fedge-coordinator: cannot start: the module {exc.name!r} is not installed:"
            " install fedge[coordinator] (pip install 'fedge[coordinator]'; with the"
            " fedge-coordinator package: sudo dpkg-reconfigure fedge-coordinator)"
        )
        return EXIT_CONFIG

    try:
        coordinator = Coordinator(config)
    except AggregationError as exc:  # no GPU (yet: a driver still loading): systemd retries
        fatal(f"fedge-coordinator: cannot start: aggregation_device: {exc}")
        return 1
    except OSError as exc:  # the HTTP API's address: in use, or not this host's
        fatal(
            f"fedge-coordinator: cannot listen on {config.http_host}:{config.http_port} (http):"
            f" {exc.strerror or exc}"
        )
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: coordinator.request_stop())
    return coordinator.run()


def _devices(args: argparse.Namespace, db: Path) -> int:
    from cloud_coordinator.fleet_view import device_table
    from cloud_coordinator.registry import read_devices

    while True:
        devices = read_devices(db)
        if args.json:
            print(json.dumps({"devices": [d.as_json() for d in devices]}, indent=2))
        else:
            if args.watch:
                print("\033[H\033[J", end="")
            print(device_table(devices))
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _rejections(args: argparse.Namespace, db: Path) -> int:
    from cloud_coordinator.registry import read_rejections

    counts = read_rejections(db)
    if args.json:
        rows = [{"channel": c, "reason": r, "count": n} for (c, r), n in counts.items()]
        print(json.dumps({"rejections": rows}, indent=2))
    elif not counts:
        print("no rejected messages")
    else:
        print(f"{'CHANNEL':<12} {'REASON':<16} COUNT")
        for (channel, reason), n in counts.items():
            print(f"{channel:<12} {reason:<16} {n}")
    return 0


def _named_command(words: list[str]) -> str | None:
    """The command `words` name (or a help/version flag), skipping the values of the
    options allowed before it: ``--data-dir serve`` names none."""
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("-h", "--help", "--version"):
            return word
        elif word in ("--config", "--data-dir"):
            skip = True
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedge-coordinator``; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if _named_command(words) is None:
        words.insert(0, "serve")
    args = _parser().parse_args(words)
    command: str = args.command
    if command == "demo":
        from cloud_coordinator.demo import DemoOptions, run_demo
        from cloud_coordinator.local_fleet import check_workdir
        from cloud_coordinator.templates import template_names

        if args.template not in template_names():
            fatal(f"fedge-coordinator demo: unknown --template {args.template!r};"
                  f" choose one of {', '.join(template_names())}")  # fmt: skip
            return 2
        try:
            check_workdir(Path(args.workdir))
            if args.broker or os.environ.get("FEDGE_MQTT_HOST"):
                split_host_port(args.broker or os.environ["FEDGE_MQTT_HOST"], "--broker")
        except (ValueError, ConfigError) as exc:
            fatal(f"fedge-coordinator demo: {exc}")
            return 2

        options = DemoOptions(
            agents=args.agents,
            rounds=args.rounds,
            template=args.template,
            compression=args.compression,
            strategy=args.strategy,
            strategy_params=_key_values(args.strategy_param, "--strategy-param"),
            mode=args.mode,
            alpha=args.alpha,
            seed=args.seed,
            broker=args.broker,
            embedded=None if args.embedded == "auto" else args.embedded,
            duration=args.duration,
            workdir=Path(args.workdir),
        )
        return run_demo(options)
    from cloud_coordinator.config import load_config
    from cloud_coordinator.errors import StoreError

    try:
        config = load_config(_flags(args), os.environ, args.config)
        if command == "serve" and not args.print_config:
            check_broker_files(config.mqtt)
            from protocols.mqtt import check_tls_files  # (paho: not for the other commands)

            check_tls_files(config.mqtt)
    except ConfigError as exc:
        fatal(f"fedge-coordinator: invalid configuration: {exc}")
        return EXIT_CONFIG
    try:
        if command == "serve":
            return _serve(args, config)
        if command == "devices":
            return _devices(args, config.db_path)
        if command == "public-key":
            from cloud_coordinator.signing_key import read_public_key
            from protocols.signing import key_text

            print(key_text(read_public_key(Path(config.data_dir))))
            return 0
        return _rejections(args, config.db_path)
    except StoreError as exc:
        fatal(f"fedge-coordinator: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
