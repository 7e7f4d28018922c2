"""Packaging: the systemd units, the example configs, the broker config, and the .deb build.

The fast tests read the files in ``packaging/`` and ``systemd/`` and check them against the
code (exit status 78, config keys, the ACL pattern). The slow one builds the wheel and both
packages and inspects them with ``dpkg-deb``. The integration ones run the shipped Mosquitto
config (with test certificates, on a free loopback port) and the daemons with the shipped
example configs.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.config import load_config as load_agent_config
from cloud_coordinator.broker import find_mosquitto, free_port, wait_for_port
from cloud_coordinator.config import CoordinatorConfig
from cloud_coordinator.config import load_config as load_coordinator_config
from cloud_coordinator.errors import StoreError
from cloud_coordinator.registry import DeviceRecord, read_devices
from protocols import __version__
from protocols.config import EXIT_CONFIG, BrokerConfig
from protocols.mqtt import ConnectError, InboundMessage, MqttClient, settings_from_config
from protocols.topics import device_acl_pattern
from tests.pki import CertFiles, TestCA
from tests.procs import Daemon, running, wait_until

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
MOSQUITTO_DIR = PACKAGING / "mosquitto"
NAMES = ("agent", "coordinator")
CONFIG_CLASSES: dict[str, type] = {"agent": AgentConfig, "coordinator": CoordinatorConfig}
EXEC_START = {
    "agent": ["/usr/bin/fedge-agent", "--config", "/etc/fedge/agent.toml"],
    "coordinator": [
        "/usr/bin/fedge-coordinator",
        "serve",
        "--config",
        "/etc/fedge/coordinator.toml",
    ],
}
PLACEHOLDER = re.compile(r"@[A-Z]+@")

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """The sections of a systemd unit file, each key with its values in order."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: continuation lines are not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None, f"{path.name}: {raw!r} is outside a section"
        assert sep, f"{path.name}: {raw!r} is not key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_of(name: str) -> Unit:
    """The parsed unit of fedge-<name>."""
    return parse_unit(ROOT / "systemd" / f"fedge-{name}.service")


def one(unit: Unit, section: str, key: str) -> str:
    """The single value of `key` in `section`."""
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set once, found {values}"
    return values[0]


def load_example(name: str) -> AgentConfig | CoordinatorConfig:
    """The shipped example config of `name`, loaded as the daemon would (no environment)."""
    path = str(PACKAGING / f"{name}.toml")
    if name == "agent":
        return load_agent_config({}, {}, path)
    return load_coordinator_config({}, {}, path)


def deb_version(version: str) -> str:
    """Debian spelling of a PEP 440 version: pre- and dev releases sort first with ``~``."""
    public, sep, local = version.partition("+")
    return re.sub(r"\.?(a|b|rc|dev)(\d+)", r"~\1\2", public) + sep + local


def _sends_ready(package: str) -> bool:
    return any("READY=1" in p.read_text() for p in (ROOT / package).glob("*.py"))


# --- systemd units ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_unit_runs_the_installed_wrapper_with_the_shipped_config(name: str) -> None:
    unit = unit_of(name)
    assert shlex.split(one(unit, "Service", "ExecStart")) == EXEC_START[name]
    assert EXIT_CONFIG == 78
    assert one(unit, "Service", "RestartPreventExitStatus") == str(EXIT_CONFIG)
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "TimeoutStopSec")
    assert one(unit, "Service", "User") == "fedge"
    assert one(unit, "Service", "Group") == "fedge"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", NAMES)
def test_unit_is_hardened_but_can_write_its_state_directory(name: str) -> None:
    service = unit_of(name)["Service"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": f"fedge-{name}",
    }
    assert {key: service.get(key, [""])[0] for key in expected} == expected
    # Telemetry reads /proc/stat and /proc/meminfo, which ProcSubset=pid would hide.
    assert "ProcSubset" not in service


@pytest.mark.parametrize("name", NAMES)
def test_unit_type_matches_what_the_daemon_tells_systemd(name: str) -> None:
    unit = unit_of(name)
    package = "agent" if name == "agent" else "cloud_coordinator"
    if _sends_ready(package):
        assert one(unit, "Service", "Type") == "notify"
        assert one(unit, "Service", "NotifyAccess") == "main"
        assert float(one(unit, "Service", "WatchdogSec")) > 0
    else:
        assert one(unit, "Service", "Type") in ("simple", "exec")
        assert "WatchdogSec" not in unit["Service"]


def test_the_agent_notifies_and_the_coordinator_does_not_yet() -> None:
    # If this changes, the test above changes what it expects of the coordinator's unit.
    assert _sends_ready("agent")
    assert not _sends_ready("cloud_coordinator")


@pytest.mark.parametrize("name", NAMES)
def test_state_directory_is_the_example_configs_data_dir(name: str) -> None:
    state = one(unit_of(name), "Service", "StateDirectory")
    assert load_example(name).data_dir == f"/var/lib/{state}"


# --- example configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "identity"), [("agent", "device"), ("coordinator", "coordinator")]
)
def test_example_config_loads_and_speaks_mutual_tls(name: str, identity: str) -> None:
    config = load_example(name)
    assert isinstance(config, CONFIG_CLASSES[name])
    assert config.mqtt.port == 8883  # the listener of packaging/mosquitto/fedge.conf
    assert config.mqtt.tls_ca == "/etc/fedge/tls/ca.crt"
    assert config.mqtt.tls_cert == f"/etc/fedge/tls/{identity}.crt"
    assert config.mqtt.tls_key == f"/etc/fedge/tls/{identity}.key"
    assert config.mqtt.tls_check_hostname
    assert config.log_format == "auto"  # journal format under systemd


def test_example_coordinator_config_keeps_the_api_on_loopback() -> None:
    config = load_example("coordinator")
    assert isinstance(config, CoordinatorConfig)
    assert (config.http_host, config.http_port) == ("127.0.0.1", 8780)


def _keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "mqtt"]


@pytest.mark.parametrize("name", NAMES)
def test_example_config_mentions_every_key(name: str) -> None:
    text = (PACKAGING / f"{name}.toml").read_text()
    keys = _keys(CONFIG_CLASSES[name]) + _keys(BrokerConfig)
    missing = [k for k in keys if not re.search(rf"^#? ?{k} = ", text, re.MULTILINE)]
    assert not missing, f"packaging/{name}.toml does not mention {missing}"


def test_configuration_doc_lists_every_key_and_variable() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    expected = []
    for cls in (AgentConfig, CoordinatorConfig):
        expected += [f"`{k}`" for k in _keys(cls)] + [f"`FEDGE_{k.upper()}`" for k in _keys(cls)]
    expected += [f"`{k}`" for k in _keys(BrokerConfig)]
    expected += [f"`FEDGE_MQTT_{k.upper()}`" for k in _keys(BrokerConfig)]
    missing = [item for item in expected if item not in text]
    assert not missing, f"docs/configuration.md does not list {missing}"


# --- broker config --------------------------------------------------------------------------------


def _directives(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values.setdefault(key, []).append(value.strip())
    return values


def test_broker_config_never_drops_queued_messages_silently() -> None:
    conf = _directives(MOSQUITTO_DIR / "fedge.conf")
    # The default, 1000, drops QoS 1 messages silently; the bytes limit must come first.
    assert int(conf["max_queued_messages"][0]) >= 1_000_000
    assert int(conf["max_queued_bytes"][0]) >= 64 * 1024 * 1024
    assert "notice" in conf["log_type"]  # where Mosquitto reports dropping
    assert conf["persistence"] == ["true"]
    assert int(conf["max_packet_size"][0]) > BrokerConfig().max_payload_bytes


def test_broker_config_requires_client_certificates_and_an_acl() -> None:
    conf = _directives(MOSQUITTO_DIR / "fedge.conf")
    assert conf["require_certificate"] == ["true"]
    assert conf["use_identity_as_username"] == ["true"]
    assert conf["use_username_as_clientid"] == ["true"]
    assert conf["allow_anonymous"] == ["false"]
    assert conf["acl_file"] == ["/etc/mosquitto/fedge.acl"]


def test_acl_confines_devices_and_names_the_default_coordinator() -> None:
    acl = _directives(MOSQUITTO_DIR / "fedge.acl")
    assert f"readwrite {device_acl_pattern()}" in acl["pattern"]
    assert "read fedge/v1/model/#" in acl["pattern"]
    assert "read fedge/v1/job/#" in acl["pattern"]
    coordinator = load_example("coordinator")
    assert isinstance(coordinator, CoordinatorConfig)
    assert acl["user"] == [f"fedge-coordinator-{coordinator.coordinator_id}"]
    assert "readwrite fedge/v1/#" in acl["topic"]


# --- maintainer scripts and the .deb build --------------------------------------------------------


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm", "wrapper"])
def test_maintainer_script_templates_are_posix_sh(script: str) -> None:
    path = PACKAGING / "deb" / script
    assert path.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _build_wheel(tmp_path: Path, pure: bool) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for package in ("agent", "cloud_coordinator", "protocols"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    env = {k: v for k, v in os.environ.items() if k != "FEDGE_PURE"}
    if pure:
        env["FEDGE_PURE"] = "1"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=120, env=env,
    )  # fmt: skip
    (built,) = out.glob("fedge-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pure wheel (``FEDGE_PURE=1``): what the agent package ships."""
    return _build_wheel(tmp_path_factory.mktemp("wheel"), pure=True)


@pytest.fixture(scope="module")
def platform_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel with the coordinator's C kernel, for this machine."""
    return _build_wheel(tmp_path_factory.mktemp("platform-wheel"), pure=False)


def _build_debs(outdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PACKAGING / "build-deb.sh"), str(outdir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def _contents(deb: Path) -> dict[str, tuple[str, str]]:
    """Path -> (mode, owner) of every entry in the package."""
    entries = {}
    for line in _dpkg_deb("--contents", str(deb)).splitlines():
        mode, owner, _size, _date, _time, path = line.split(maxsplit=5)
        entries[path.split(" -> ")[0].rstrip("/")] = (mode, owner)
    return entries


def _check_package(
    deb: Path, name: str, wheel: Path, version: str, arch: str, tmp_path: Path
) -> None:
    pkg = f"fedge-{name}"
    other = "coordinator" if name == "agent" else "agent"
    fields = {
        field: _dpkg_deb("--field", str(deb), field).strip()
        for field in ("Package", "Version", "Architecture", "Depends", "Breaks")
    }
    assert fields == {
        "Package": pkg,
        "Version": version,
        "Architecture": arch,
        "Depends": "python3 (>= 3.11), python3-venv",
        "Breaks": f"fedge-{other} (<< {version}), fedge-{other} (>> {version})",
    }
    assert _dpkg_deb("--info", str(deb), "conffiles").split() == [f"/etc/fedge/{name}.toml"]

    entries = _contents(deb)
    wrapper = EXEC_START[name][0]
    assert entries[f".{wrapper}"] == ("-rwxr-xr-x", "root/root")
    for path in (
        f"./lib/systemd/system/{pkg}.service",
        f"./etc/fedge/{name}.toml",
        f"./usr/share/fedge/wheels/{name}/{wheel.name}",
        f"./usr/share/doc/{pkg}/operations.md",
    ):
        assert entries[path] == ("-rw-r--r--", "root/root"), path
    assert {owner for _mode, owner in entries.values()} == {"root/root"}

    files, control = tmp_path / f"{pkg}-files", tmp_path / f"{pkg}-control"
    _dpkg_deb("--extract", str(deb), str(files))
    _dpkg_deb("--control", str(deb), str(control))
    unit = files / f"lib/systemd/system/{pkg}.service"
    assert unit.read_bytes() == (ROOT / "systemd" / f"{pkg}.service").read_bytes()
    example = files / f"etc/fedge/{name}.toml"
    assert example.read_bytes() == (PACKAGING / f"{name}.toml").read_bytes()
    assert shlex.split(one(parse_unit(unit), "Service", "ExecStart"))[0] == wrapper

    wrapper_text = (files / wrapper.lstrip("/")).read_text()
    assert f"exe=/opt/fedge/venv/bin/{pkg}\n" in wrapper_text
    assert 'exec "$exe" "$@"' in wrapper_text
    for script in (files / wrapper.lstrip("/"), control / "postinst", control / "prerm"):
        text = script.read_text()
        assert not PLACEHOLDER.search(text), f"{script.name} has unfilled placeholders"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        subprocess.run(["sh", "-n", str(script)], check=True)
    postinst = (control / "postinst").read_text()
    assert f"EXTRA={name}\n" in postinst
    assert f"WHEEL=/usr/share/fedge/wheels/{name}/{wheel.name}\n" in postinst
    assert 'install --quiet "${WHEEL}[$EXTRA]"' in postinst


@pytest.mark.slow
def test_the_wheels_are_pure_and_with_the_kernel(wheel: Path, platform_wheel: Path) -> None:
    assert wheel.name == f"fedge-{__version__}-py3-none-any.whl"
    assert platform_wheel.name.startswith(f"fedge-{__version__}-cp311-abi3-linux_")
    names = {w: set(zipfile.ZipFile(w).namelist()) for w in (wheel, platform_wheel)}
    assert not any(n.endswith(".so") for n in names[wheel])  # nothing compiled
    assert "cloud_coordinator/checked_sums.py" in names[wheel]
    assert "cloud_coordinator/_fold.abi3.so" in names[platform_wheel]
    assert not any(n.endswith(".c") for n in names[wheel] | names[platform_wheel])


@pytest.mark.slow
def test_build_deb_makes_both_packages(wheel: Path, platform_wheel: Path, tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian/Ubuntu: apt-get install dpkg)")
    outdir = tmp_path / "dist"
    outdir.mkdir()
    shutil.copy(wheel, outdir)
    shutil.copy(platform_wheel, outdir)
    version = deb_version(__version__)
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}[
        platform_wheel.name.rsplit("linux_", 1)[1].removesuffix(".whl")
    ]

    result = _build_debs(outdir)
    assert result.returncode == 0, result.stdout + result.stderr
    # the agent: the pure wheel, for any device; the coordinator: the kernel, this machine
    shipped = {"agent": (wheel, "all"), "coordinator": (platform_wheel, arch)}
    debs = {name: outdir / f"fedge-{name}_{version}_{shipped[name][1]}.deb" for name in NAMES}
    for name, deb in debs.items():
        assert str(deb) in result.stdout
        package_wheel, package_arch = shipped[name]
        _check_package(deb, name, package_wheel, version, package_arch, tmp_path)

    listing = {deb: _dpkg_deb("--contents", str(deb)) for deb in debs.values()}
    again = _build_debs(outdir)  # idempotent: same packages, nothing else in OUTDIR
    assert again.returncode == 0, again.stdout + again.stderr
    assert {deb: _dpkg_deb("--contents", str(deb)) for deb in debs.values()} == listing
    assert sorted(p.name for p in outdir.iterdir()) == sorted(
        [wheel.name, platform_wheel.name, *(d.name for d in debs.values())]
    )


@pytest.mark.slow
def test_build_deb_maps_pre_releases_and_refuses_ambiguous_input(
    wheel: Path, tmp_path: Path
) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian/Ubuntu: apt-get install dpkg)")
    rc = tmp_path / "rc"
    rc.mkdir()
    shutil.copy(wheel, rc / "fedge-0.2.0rc1-py3-none-any.whl")
    result = _build_debs(rc)
    assert result.returncode == 0, result.stderr
    assert deb_version("0.2.0rc1") == "0.2.0~rc1"
    assert (rc / "fedge-agent_0.2.0~rc1_all.deb").is_file()
    assert (rc / "fedge-coordinator_0.2.0~rc1_all.deb").is_file()  # no platform wheel: pure
    assert _dpkg_deb("--field", str(rc / "fedge-agent_0.2.0~rc1_all.deb"), "Version").strip() == (
        "0.2.0~rc1"
    )

    shutil.copy(wheel, rc / "fedge-0.3.0-py3-none-any.whl")  # two wheels: which one?
    result = _build_debs(rc)
    assert result.returncode != 0
    assert "expected exactly one" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _build_debs(empty).returncode != 0


# --- the shipped broker config and example configs, running ---------------------------------------


@dataclass
class ShippedBroker:
    """Mosquitto running packaging/mosquitto/fedge.conf with test certificates."""

    ca: TestCA
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def tls(self, identity: str) -> BrokerConfig:
        """Broker settings for a client whose certificate CN is `identity`."""
        files: CertFiles = self.ca.issue(identity)
        return BrokerConfig(
            host="127.0.0.1",
            port=self.port,
            tls_ca=str(self.ca.ca_file),
            tls_cert=str(files.cert),
            tls_key=str(files.key),
        )


def _shipped_conf(ca: TestCA, server: CertFiles, acl: Path, port: int, workdir: Path) -> str:
    text = (MOSQUITTO_DIR / "fedge.conf").read_text()
    replacements = {
        "listener 8883\n": f"listener {port} 127.0.0.1\n",
        "cafile /etc/mosquitto/certs/ca.crt\n": f"cafile {ca.ca_file}\n",
        "certfile /etc/mosquitto/certs/server.crt\n": f"certfile {server.cert}\n",
        "keyfile /etc/mosquitto/certs/server.key\n": f"keyfile {server.key}\n",
        "acl_file /etc/mosquitto/fedge.acl\n": f"acl_file {acl}\n",
    }
    for old, new in replacements.items():
        assert old in text, f"fedge.conf no longer has {old!r}: update this test"
        text = text.replace(old, new)
    # Test-only additions: stay the current user (root would drop to `mosquitto`, who
    # cannot read tmp_path), and keep the database and log in the test's directory.
    extra = [f"user {getpass.getuser()}", f"persistence_location {workdir}/"]
    return text + "\n".join([*extra, f"log_dest file {workdir / 'mosquitto.log'}", ""])


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[ShippedBroker]:
    """Mosquitto with the shipped fedge.conf and fedge.acl on a free loopback port."""
    binary = find_mosquitto()
    if binary is None:
        raise RuntimeError("mosquitto is not installed; `make test` installs it (apt-get)")
    workdir = tmp_path / "broker"
    workdir.mkdir()
    ca = TestCA(tmp_path / "pki")
    acl = workdir / "fedge.acl"
    shutil.copy(MOSQUITTO_DIR / "fedge.acl", acl)
    port = free_port()
    conf = workdir / "fedge.conf"
    conf.write_text(_shipped_conf(ca, ca.issue("broker", server=True), acl, port, workdir))
    with open(workdir / "stderr.log", "wb") as err:
        process = subprocess.Popen([binary, "-c", str(conf)], stdout=err, stderr=err)
    try:
        if not wait_for_port("127.0.0.1", port, 10, process):
            raise RuntimeError(
                "mosquitto did not start with the shipped config: "
                + (workdir / "stderr.log").read_text(errors="replace")
            )
        yield ShippedBroker(ca, port, process, workdir / "mosquitto.log")
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


class _Client:
    """An MqttClient that collects what it receives and its connection changes."""

    def __init__(self, broker: BrokerConfig, client_id: str, *filters: str) -> None:
        self.received: queue.Queue[InboundMessage] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []
        self.connection: list[bool] = []
        self.mqtt = MqttClient(
            settings_from_config(broker, client_id=client_id),
            on_message=self.received.put,
            on_connection=self.connection.append,
        )
        for topic_filter in filters:
            self.mqtt.subscribe(topic_filter, qos=1)

    def start(self) -> _Client:
        self.mqtt.start()
        self.mqtt.wait_connected(5)
        return self

    def drain(self) -> list[tuple[str, bytes]]:
        """Everything received so far."""
        while not self.received.empty():
            message = self.received.get_nowait()
            self.seen.append((message.topic, message.payload))
        return self.seen

    def got(self, topic: str, payload: bytes) -> bool:
        """True once (`topic`, `payload`) has arrived."""
        return (topic, payload) in self.drain()


def _sync(sender: _Client, receiver: _Client, topic: str) -> None:
    """Publish on `topic` until `receiver` gets it: its subscriptions are then in place."""
    n = 0

    def arrived() -> bool:
        nonlocal n
        n += 1
        sender.mqtt.publish(topic, f"sync-{n}".encode(), qos=1)
        return any(t == topic and p.startswith(b"sync-") for t, p in receiver.drain())

    wait_until(arrived, timeout=10, interval=0.2)


@pytest.mark.integration
def test_shipped_broker_config_enforces_the_acl(shipped_broker: ShippedBroker) -> None:
    coordinator = _Client(
        shipped_broker.tls("fedge-coordinator-main"), "fedge-coordinator-main", "fedge/v1/#"
    )
    dev1 = _Client(
        shipped_broker.tls("dev1"),
        "dev1",
        "fedge/v1/dev/dev1/cmd",
        "fedge/v1/model/#",
        "fedge/v1/dev/dev2/#",  # may be granted, but nothing of dev2's may be delivered
    )
    clients = [coordinator, dev1]
    try:
        coordinator.start()
        dev1.start()
        _sync(coordinator, dev1, "fedge/v1/dev/dev1/cmd")
        _sync(dev1, coordinator, "fedge/v1/dev/dev1/status")

        # A device writes only under its own id. (Mosquitto 2.0 also drops the connection of
        # a client whose publish it denies; the client reconnects and goes on.) Messages from
        # one client arrive in order, so once its marker is in, anything the broker let
        # through before it would be too.
        intruder = _Client(shipped_broker.tls("dev3"), "dev3")
        clients.append(intruder)
        intruder.start()
        intruder.mqtt.publish("fedge/v1/dev/dev2/telemetry", b"spoofed", qos=1)
        intruder.mqtt.publish("fedge/v1/model/m/manifest", b"device model", qos=1)
        intruder.mqtt.publish("fedge/v1/dev/dev3/telemetry", b"marker-1", qos=1)
        wait_until(lambda: coordinator.got("fedge/v1/dev/dev3/telemetry", b"marker-1"), 15)
        payloads = [p for _t, p in coordinator.drain()]
        assert b"spoofed" not in payloads
        assert b"device model" not in payloads

        # It reads models and its own commands, never another device's topics.
        coordinator.mqtt.publish("fedge/v1/dev/dev2/cmd", b"for dev2", qos=1)
        coordinator.mqtt.publish("fedge/v1/model/m/manifest", b"model", qos=1)
        coordinator.mqtt.publish("fedge/v1/dev/dev1/cmd", b"marker-2", qos=1)
        wait_until(lambda: dev1.got("fedge/v1/dev/dev1/cmd", b"marker-2"), 10)
        assert ("fedge/v1/model/m/manifest", b"model") in dev1.drain()
        assert b"for dev2" not in [p for _t, p in dev1.drain()]

        # The client id is replaced by the certificate's CN, so dev2 connecting as "dev1"
        # does not take over dev1's session.
        impostor = _Client(shipped_broker.tls("dev2"), "dev1")
        clients.append(impostor)
        impostor.start()
        dev1.mqtt.publish("fedge/v1/dev/dev1/telemetry", b"marker-3", qos=1)
        wait_until(lambda: coordinator.got("fedge/v1/dev/dev1/telemetry", b"marker-3"), 10)
        assert dev1.connection == [True]
        assert "as dev2" in shipped_broker.log.read_text()

        # No certificate, no connection.
        no_cert = BrokerConfig(
            host="127.0.0.1", port=shipped_broker.port, tls_ca=str(shipped_broker.ca.ca_file)
        )
        anonymous = _Client(no_cert, "anonymous")
        clients.append(anonymous)
        with pytest.raises(ConnectError):
            anonymous.start()
    finally:
        for client in clients:
            client.mqtt.stop()


def _daemon_env(broker: BrokerConfig, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    env.update(
        FEDGE_MQTT_HOST=broker.host,
        FEDGE_MQTT_PORT=str(broker.port),
        FEDGE_MQTT_TLS_CA=str(broker.tls_ca),
        FEDGE_MQTT_TLS_CERT=str(broker.tls_cert),
        FEDGE_MQTT_TLS_KEY=str(broker.tls_key),
        FEDGE_DATA_DIR=str(data_dir),
        FEDGE_LOG_FORMAT="text",
        PYTHONUNBUFFERED="1",
    )
    return env


def _device(db: Path, device_id: str) -> DeviceRecord | None:
    try:
        return next((d for d in read_devices(db) if d.device_id == device_id), None)
    except StoreError:
        return None


@pytest.mark.integration
def test_example_configs_bring_a_device_online_through_the_shipped_broker(
    shipped_broker: ShippedBroker, tmp_path: Path
) -> None:
    coord_dir, agent_dir = tmp_path / "coordinator", tmp_path / "agent"
    coord_dir.mkdir()
    agent_dir.mkdir()
    coordinator = Daemon(
        ["-m", "cloud_coordinator", "serve", "--config", str(PACKAGING / "coordinator.toml"),
         "--http", f"127.0.0.1:{free_port()}"],
        _daemon_env(shipped_broker.tls("fedge-coordinator-main"), coord_dir),
        coord_dir / "coordinator.log",
    )  # fmt: skip
    agent = Daemon(
        ["-m", "agent", "--config", str(PACKAGING / "agent.toml"), "--device-id", "edge-0001"],
        _daemon_env(shipped_broker.tls("edge-0001"), agent_dir),
        agent_dir / "agent.log",
    )
    db = coord_dir / "coordinator.db"
    with running(coordinator, agent):
        try:
            wait_until(lambda: (r := _device(db, "edge-0001")) is not None and r.online, 15)
            agent.signal(signal.SIGTERM)
            assert agent.wait() == 0
            wait_until(lambda: (r := _device(db, "edge-0001")) is not None and not r.online, 10)
            record = _device(db, "edge-0001")
            assert record is not None
            assert record.status_reason == "shutdown"
        except AssertionError:
            print(coordinator.output(), agent.output(), sep="\n")
            raise
        coordinator.signal(signal.SIGTERM)
        assert coordinator.wait() == 0
