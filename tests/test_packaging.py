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
import tempfile
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
from tests.broker import mosquitto_running
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


@pytest.mark.parametrize("name", NAMES)
def test_units_leave_gpu_device_nodes_to_a_drop_in(name: str) -> None:
    # PrivateDevices=yes hides /dev/nvidia* and the Jetson nodes with no way back for a
    # drop-in, so inference_providers = "cuda" / "tensorrt" could never work.
    service = unit_of(name)["Service"]
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    if name == "agent":  # closed, and opened by DeviceAllow= in a drop-in (operations.md)
        assert one(unit_of(name), "Service", "DevicePolicy") == "closed"
        assert "DeviceAllow" not in service


def test_the_agent_socket_directory_is_writable_and_for_fedge_clients() -> None:
    unit = unit_of("agent")
    listen = load_example("agent").inference_listen
    assert listen.startswith("unix:")
    socket_dir = str(Path(listen.removeprefix("unix:")).parent)
    assert socket_dir == "/run/fedge-agent"
    # ProtectSystem=strict: the rest of /run is read-only
    assert one(unit, "Service", "ReadWritePaths") == socket_dir
    # made by root before each start: owner fedge, group fedge-clients, set-group-ID, so the
    # agent's socket (it makes it 0660) is in group fedge-clients, not fedge
    prefix, _, command = one(unit, "Service", "ExecStartPre").partition("/")
    assert prefix == "+"
    assert shlex.split("/" + command) == [
        "/usr/bin/install", "-d", "-o", "fedge", "-g", "fedge-clients", "-m", "2750", socket_dir
    ]  # fmt: skip
    # systemd would give a RuntimeDirectory= the service's group (fedge) before each command
    assert "RuntimeDirectory" not in unit["Service"]


_SERVE_SOCKET = """
import os, sys
from agent.config import ListenAddress
from agent.http_api import ApiServer
server = ApiServer(object(), ListenAddress(path=sys.argv[1]))  # type: ignore[arg-type]
server.start()
st = os.stat(sys.argv[1])
print(st.st_gid, oct(st.st_mode & 0o7777), flush=True)
sys.stdin.read()
server.stop()
"""
_CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n    s.connect(sys.argv[1])\nexcept OSError as exc:\n    sys.exit(exc.strerror)\n"
)


def _as(uid: int, gid: int, groups: list[int]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv (other users and groups)")  # fmt: skip
def test_the_agents_socket_in_the_unit_directory_is_for_fedge_clients_only() -> None:
    """The unit's ExecStartPre and the agent's own socket code, with stand-in ids: the
    agent (not a member of fedge-clients) binds in the set-group-ID directory; members of
    fedge-clients may connect, members of fedge only (and others) may not."""
    agent, fedge, clients, app, other = 65534, 65533, 64999, 64998, 64997
    base = Path(tempfile.mkdtemp(prefix="fedge-sock-", dir="/tmp"))
    try:
        base.chmod(0o755)
        socket_dir = base / "fedge-agent"
        command = shlex.split(one(unit_of("agent"), "Service", "ExecStartPre").lstrip("+"))
        command = [str(socket_dir) if a == "/run/fedge-agent" else a for a in command]
        command = [{"fedge": str(agent), "fedge-clients": str(clients)}.get(a, a) for a in command]
        subprocess.run(command, check=True)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent",
               "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
        check = subprocess.run([*_as(agent, fedge, []), sys.executable, "-c", "import agent"],
                               env=env, capture_output=True, cwd="/")  # fmt: skip
        if check.returncode != 0:
            pytest.skip(f"the checkout is not readable by uid {agent}")
        path = socket_dir / "agent.sock"
        with subprocess.Popen(
            [*_as(agent, fedge, []), sys.executable, "-c", _SERVE_SOCKET, str(path)],
            env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ) as server:  # fmt: skip
            assert server.stdout is not None
            assert server.stdin is not None
            assert server.stdout.readline().split() == [str(clients), "0o660"]

            def connect(gid: int, groups: list[int]) -> str:
                result = subprocess.run(
                    [*_as(app, gid, groups), sys.executable, "-c", _CONNECT, str(path)],
                    env=env, cwd="/", capture_output=True, text=True, timeout=30,
                )  # fmt: skip
                return "ok" if result.returncode == 0 else result.stderr.strip()

            assert connect(other, [clients]) == "ok"
            assert connect(clients, []) == "ok"
            assert connect(other, [fedge]) == "Permission denied"
            assert connect(other, []) == "Permission denied"
            server.stdin.close()
            assert server.wait(timeout=30) == 0
        assert not path.exists()
    finally:
        shutil.rmtree(base)


def _operations_gpu_drop_in() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"### GPU inference\n.*?```ini\n(.*?)```", text, re.DOTALL)
    assert match, "docs/operations.md has no GPU drop-in"
    return match.group(1)


def test_the_documented_gpu_drop_in_opens_the_nvidia_nodes() -> None:
    drop_in = _operations_gpu_drop_in()
    allowed = re.findall(r"^DeviceAllow=(\S+) rw$", drop_in, re.MULTILINE)
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"} <= set(allowed)


def test_units_and_the_gpu_drop_in_pass_systemd_analyze(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for name in NAMES:  # the wrapper is not installed here: a command that exists
        text = (ROOT / "systemd" / f"fedge-{name}.service").read_text()
        (tmp_path / f"fedge-{name}.service").write_text(
            text.replace(EXEC_START[name][0], "/bin/true")
        )
    drop_ins = tmp_path / "fedge-agent.service.d"
    drop_ins.mkdir()
    (drop_ins / "gpu.conf").write_text(_operations_gpu_drop_in())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./fedge-{n}.service" for n in NAMES)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fedge" not in result.stdout + result.stderr, result.stdout + result.stderr


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


SCRIPTS = ("preinst", "postinst", "prerm", "postrm")


@pytest.mark.parametrize("script", [*SCRIPTS, "wrapper"])
def test_maintainer_script_templates_are_posix_sh(script: str) -> None:
    path = PACKAGING / "deb" / script
    assert path.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# The maintainer scripts and the wrapper, run for real in a fake root: every path they
# touch is moved under it, and the commands that would change this host (useradd, systemctl,
# chown, ...) or need the network (pip) are stubs that log what they were asked to do.
_MOVED = re.compile(
    r"/(?:opt/fedge|etc/fedge|usr/share/fedge|run/systemd/system|var/lib/fedge"
    r"|etc/systemd/system|usr/bin/fedge-)"
)
_STUBS = {
    "groupadd": 'echo "groupadd $*" >>"$FAKE_LOG"',
    "useradd": 'echo "useradd $*" >>"$FAKE_LOG"',
    "chown": 'echo "chown $*" >>"$FAKE_LOG"',
    "getent": "exit 2",  # no such user or group yet
    "dpkg-statoverride": "exit 1",  # no override
    "dpkg": '[ "$1" = --print-architecture ] && echo "${FAKE_ARCH:-amd64}"',
    "systemctl": 'echo "systemctl $*" >>"$FAKE_LOG"\n'
    '[ "$1" != is-enabled ] || [ "${FAKE_ENABLED:-}" = 1 ]',
    # install -o/-g need the user and group: dropped
    "install": 'a=""; while [ $# -gt 0 ]; do case "$1" in -o|-g) shift 2 ;;'
    ' *) a="$a $1"; shift ;; esac; done; exec /usr/bin/install $a',
    # the system's python3: `--version`, and `-m venv --clear DIR` making a fake venv whose
    # bin/python is a link to $FAKE_PYTHON (another target: python3 was upgraded)
    "python3": '[ "$1" = --version ] && { echo "Python 3.99"; exit 0; }\n'
    '[ "$1 $2 $3" = "-m venv --clear" ] || exit 1\n'
    'rm -rf "$4"; mkdir -p "$4/bin"; ln -s "$FAKE_PYTHON" "$4/bin/python"; touch "$4/pip-works"',
    # the venv's python: pip works while pip-works is there; "[extra]" fails with
    # FAKE_PIP_FAIL=deps; an install adds the console scripts; -c (fedge's version, torch)
    # finds nothing
    "venv-python": 'venv=$(cd "$(dirname "$0")/.." && pwd)\n'
    'echo "python $*" >>"$FAKE_LOG"\n'
    '[ "$1 $2" = "-m pip" ] && [ -e "$venv/pip-works" ] || exit 1\n'
    'case "$*" in *--version*) exit 0 ;;\n'
    '  *"]"*) [ "${FAKE_PIP_FAIL:-}" != deps ] || exit 1 ;; esac\n'
    "for b in fedge-agent fedge-coordinator; do\n"
    '  printf \'#!/bin/sh\\necho "%s ran: $*"\\n\' "$b" >"$venv/bin/$b"; chmod +x "$venv/bin/$b"\n'
    "done",
}


def render(template: str, name: str, arch: str = "all", version: str = "0.1.0") -> str:
    """`template` from packaging/deb/ with its @NAME@ placeholders filled as build-deb.sh does."""
    values = {"PACKAGE": f"fedge-{name}", "BIN": f"fedge-{name}", "EXTRA": name,
              "VERSION": version, "WHEEL": f"fedge-{version}-py3-none-any.whl",
              "ARCH": arch}  # fmt: skip
    text = (PACKAGING / "deb" / template).read_text()
    return PLACEHOLDER.sub(lambda m: values[m.group(0).strip("@")], text)


@dataclass
class FakeRoot:
    """A directory standing for /, with stubbed commands; `run` runs a rendered script."""

    root: Path
    name: str = "agent"
    arch: str = "all"

    def __post_init__(self) -> None:
        stubs = self.root / "stubs"
        stubs.mkdir(parents=True)
        for command, body in _STUBS.items():
            (stubs / command).write_text(f"#!/bin/sh\n{body}\n")
            (stubs / command).chmod(0o755)
        shutil.copy(stubs / "venv-python", stubs / "python3.11")
        shutil.copy(stubs / "venv-python", stubs / "python3.12")
        for path in ("etc/fedge", f"usr/share/fedge/wheels/{self.name}"):
            (self.root / path).mkdir(parents=True)
        (self.root / f"etc/fedge/{self.name}.toml").write_text("")
        self.env = {"PATH": f"{stubs}:/usr/bin:/bin", "FAKE_LOG": str(self.root / "log"),
                    "FAKE_PYTHON": str(stubs / "python3.11")}  # fmt: skip

    @property
    def venv(self) -> Path:
        return self.root / "opt/fedge/venv"

    @property
    def log(self) -> str:
        path = self.root / "log"
        return path.read_text() if path.exists() else ""

    def systemd_running(self) -> None:
        (self.root / "run/systemd/system").mkdir(parents=True, exist_ok=True)

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        text = _MOVED.sub(
            lambda m: f"{self.root}{m.group(0)}", render(script, self.name, self.arch)
        )
        path = self.root / f"{script}.sh"
        path.write_text(text)
        return subprocess.run(
            ["sh", str(path), *args], env={**self.env, **env}, capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip


@pytest.fixture
def fake_root(tmp_path: Path) -> FakeRoot:
    return FakeRoot(tmp_path / "root")


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_preinst_installs_on_64_bit_machines(fake_root: FakeRoot, arch: str) -> None:
    for args in (("install",), ("upgrade", "0.0.9"), ("abort-upgrade", "0.2.0")):
        result = fake_root.run("preinst", *args, FAKE_ARCH=arch)
        assert (result.returncode, result.stderr) == (0, ""), args


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["armhf", "armel", "i386"])
def test_preinst_refuses_machines_without_onnxruntime_wheels(
    tmp_path: Path, name: str, arch: str
) -> None:
    fake_root = FakeRoot(tmp_path / "root", name)
    result = fake_root.run("preinst", "install", FAKE_ARCH=arch)
    assert result.returncode == 1
    assert f"fedge-{name}: this machine's architecture, {arch}, is not supported" in result.stderr
    assert "amd64 (x86_64) and arm64 (aarch64)" in result.stderr
    assert not (fake_root.root / "opt").exists()  # before anything is unpacked
    forced = fake_root.run("preinst", "install", FAKE_ARCH=arch, FEDGE_SKIP_PLATFORM_CHECK="1")
    assert forced.returncode == 0
    assert "FEDGE_SKIP_PLATFORM_CHECK is set" in forced.stderr


def _wrapper(fake_root: FakeRoot, *args: str) -> subprocess.CompletedProcess[str]:
    return fake_root.run("wrapper", *args)


def test_postinst_creates_the_groups_and_the_venv_the_wrapper_runs(fake_root: FakeRoot) -> None:
    result = fake_root.run("postinst", "configure", "")
    assert result.returncode == 0, result.stderr
    log = fake_root.log
    assert "groupadd --system fedge\n" in log
    assert "groupadd --system fedge-clients\n" in log  # the inference socket's group
    assert "--gid fedge " in log  # the service user's only group
    stamp = fake_root.venv / ".fedge-agent.ready"
    assert stamp.read_text().strip() == fake_root.env["FAKE_PYTHON"]
    ran = _wrapper(fake_root, "--version")
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "fedge-agent ran: --version\n", "")


def test_the_coordinator_has_no_socket_group(tmp_path: Path) -> None:
    fake_root = FakeRoot(tmp_path / "root", "coordinator", arch="amd64")
    result = fake_root.run("postinst", "configure", "")
    assert result.returncode == 0, result.stderr
    assert "fedge-clients" not in fake_root.log
    # the torch note names this package's own file (Architecture: amd64 or all)
    assert "apt-get install ./fedge-coordinator_0.1.0_amd64.deb" in result.stdout
    assert _wrapper(fake_root, "serve").stdout == "fedge-coordinator ran: serve\n"
    pure = FakeRoot(tmp_path / "pure", "coordinator", arch="all").run("postinst", "configure", "")
    assert "apt-get install ./fedge-coordinator_0.1.0_all.deb" in pure.stdout


def test_a_failed_pip_leaves_the_wrapper_refusing_with_what_to_run(fake_root: FakeRoot) -> None:
    # pip installed fedge from the wheel (--no-deps), then failed on its dependencies
    result = fake_root.run("postinst", "configure", "", FAKE_PIP_FAIL="deps")
    assert result.returncode == 1
    assert "sudo dpkg --configure -a" in result.stderr
    assert (fake_root.venv / "bin/fedge-agent").exists()  # the old check passed on this
    assert not (fake_root.venv / ".fedge-agent.ready").exists()
    ran = _wrapper(fake_root, "--version")
    assert ran.returncode == 1
    assert ran.stdout == ""
    assert "its installation did not finish" in ran.stderr
    assert "sudo dpkg --configure -a" in ran.stderr
    assert "sudo dpkg-reconfigure fedge-agent" in ran.stderr
    # from dpkg-reconfigure the package stays "installed": dpkg --configure would do nothing
    again = fake_root.run("postinst", "configure", "0.1.0", FAKE_PIP_FAIL="deps",
                          DEBCONF_RECONFIGURE="1")  # fmt: skip
    assert again.returncode == 1
    assert "sudo dpkg-reconfigure fedge-agent" in again.stderr
    assert "dpkg --configure -a" not in again.stderr
    fixed = fake_root.run("postinst", "configure", "", DEBCONF_RECONFIGURE="1")
    assert fixed.returncode == 0, fixed.stderr
    assert _wrapper(fake_root, "x").returncode == 0


def test_after_a_python_upgrade_dpkg_reconfigure_rebuilds_the_venv(fake_root: FakeRoot) -> None:
    assert fake_root.run("postinst", "configure", "").returncode == 0
    # python3 moved to 3.12: the venv's python is another interpreter, without pip
    (fake_root.venv / "bin/python").unlink()
    (fake_root.venv / "bin/python").symlink_to(fake_root.root / "stubs/python3.12")
    (fake_root.venv / "pip-works").unlink()
    ran = _wrapper(fake_root, "--version")
    assert ran.returncode == 1
    assert "was set up for" in ran.stderr
    assert "python3 is now" in ran.stderr
    assert "sudo dpkg-reconfigure fedge-agent" in ran.stderr
    # what `dpkg-reconfigure fedge-agent` runs: postinst configure <installed version>
    python = str(fake_root.root / "stubs/python3.12")
    result = fake_root.run("postinst", "configure", "0.1.0", FAKE_PYTHON=python)
    assert result.returncode == 0, result.stderr
    assert "recreating it" in result.stdout
    assert "dpkg-reconfigure" in result.stdout  # for the other fedge package
    assert (fake_root.venv / ".fedge-agent.ready").read_text().strip() == python
    assert _wrapper(fake_root, "--version").returncode == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_postinst_abort_upgrade_starts_the_service_prerm_stopped(
    fake_root: FakeRoot, enabled: bool
) -> None:
    fake_root.systemd_running()
    env = {"FAKE_ENABLED": "1" if enabled else "0"}
    stopped = fake_root.run("prerm", "upgrade", "0.2.0", **env)
    assert stopped.returncode == 0, stopped.stderr
    assert "systemctl stop fedge-agent.service\n" in fake_root.log
    result = fake_root.run("postinst", "abort-upgrade", "0.2.0", **env)
    assert result.returncode == 0, result.stderr
    assert ("systemctl start fedge-agent.service\n" in fake_root.log) == enabled
    assert not (fake_root.root / "opt").exists()  # nothing installed: only the service


def test_postinst_restarts_an_enabled_service_after_configure(fake_root: FakeRoot) -> None:
    fake_root.systemd_running()
    result = fake_root.run("postinst", "configure", "0.0.9", FAKE_ENABLED="1")
    assert result.returncode == 0, result.stderr
    assert (
        "systemctl daemon-reload\nsystemctl is-enabled --quiet fedge-agent.service\n"
        "systemctl restart fedge-agent.service\n" in fake_root.log
    )


def test_postrm_forgets_the_packages_stamp(fake_root: FakeRoot) -> None:
    assert fake_root.run("postinst", "configure", "").returncode == 0
    (fake_root.root / "usr/bin").mkdir(parents=True)
    (fake_root.root / "usr/bin/fedge-coordinator").touch()  # the other package stays
    assert fake_root.run("postrm", "remove").returncode == 0
    assert fake_root.venv.is_dir()
    assert not (fake_root.venv / ".fedge-agent.ready").exists()


def test_recovery_commands_work_for_a_locally_installed_package() -> None:
    # `apt-get install --reinstall fedge-agent` needs the package in an apt source ("cannot
    # be downloaded") and `dpkg --configure -a` does nothing for a configured package.
    for path in (ROOT / "docs" / "operations.md", PACKAGING / "deb" / "wrapper",
                 PACKAGING / "deb" / "postinst", ROOT / "README.md"):  # fmt: skip
        text = path.read_text()
        assert not re.search(r"--reinstall\s+fedge-", text), path
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "sudo dpkg-reconfigure fedge-agent" in operations


def test_operations_doc_gives_the_data_directory_to_the_service_user() -> None:
    # install -D ... -t <state>/data/ made data/ root's: no feedback.npz for the agent
    text = (ROOT / "docs" / "operations.md").read_text()
    assert not re.search(r"install -D[^\n]*/var/lib/fedge-agent", text)
    assert re.search(
        r"sudo install -d -m 0750 -o fedge -g fedge [^\n]*/var/lib/fedge-agent/data\n", text
    )


def test_operations_doc_gives_applications_the_clients_group_only() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "usermod -aG fedge-clients" in text
    assert not re.search(r"usermod -aG fedge\b(?!-)", text)
    assert "unix:/run/fedge-agent/agent.sock" in text


def _stand_in_wheels(directory: Path, arch: str) -> None:
    """The pure wheel and a coordinator wheel for `arch` (stand-ins: build-deb.sh reads
    only their names), or skip without dpkg-deb."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian/Ubuntu: apt-get install dpkg)")
    (directory / "fedge-0.1.0-py3-none-any.whl").write_bytes(b"stand-in")
    (directory / f"fedge-0.1.0-cp311-abi3-linux_{arch}.whl").write_bytes(b"stand-in")


def test_build_deb_refuses_a_32_bit_arm_coordinator_wheel(tmp_path: Path) -> None:
    _stand_in_wheels(tmp_path, "armv7l")
    result = _build_debs(tmp_path)
    assert result.returncode != 0
    assert "32-bit ARM (armhf)" in result.stderr
    assert not list(tmp_path.glob("*.deb"))


def test_build_deb_ships_every_maintainer_script_filled_in(tmp_path: Path) -> None:
    _stand_in_wheels(tmp_path, "aarch64")
    result = _build_debs(tmp_path)
    assert result.returncode == 0, result.stderr
    debs = {
        "agent": "fedge-agent_0.1.0_all.deb",
        "coordinator": "fedge-coordinator_0.1.0_arm64.deb",
    }
    for name, deb in debs.items():
        control = tmp_path / f"{name}-control"
        _dpkg_deb("--control", str(tmp_path / deb), str(control))
        for script in SCRIPTS:
            text = (control / script).read_text()
            assert not PLACEHOLDER.search(text), f"{script} has unfilled placeholders"
            assert os.access(control / script, os.X_OK)
        arch = deb.rsplit("_", 1)[1].removesuffix(".deb")
        assert f"ARCH={arch}\n" in (control / "postinst").read_text()


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
    assert "venv=/opt/fedge/venv\n" in wrapper_text
    assert f"exe=$venv/bin/{pkg}\n" in wrapper_text
    assert 'exec "$exe" "$@"' in wrapper_text
    for script in (files / wrapper.lstrip("/"), *(control / s for s in SCRIPTS)):
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
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[
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
    server = ca.issue("broker", server=True)
    conf = workdir / "fedge.conf"
    for attempt in range(3):  # (a port found free can be taken before mosquitto binds it)
        port = free_port()
        conf.write_text(_shipped_conf(ca, server, acl, port, workdir))
        with open(workdir / "stderr.log", "wb") as err:
            process = subprocess.Popen([binary, "-c", str(conf)], stdout=err, stderr=err)
        if wait_for_port("127.0.0.1", port, 10, process) and mosquitto_running(
            workdir / "mosquitto.log", process, 10
        ):
            break
        process.kill()
        process.wait()
        said = (workdir / "stderr.log").read_text(errors="replace")
        if (workdir / "mosquitto.log").exists():
            said += (workdir / "mosquitto.log").read_text(errors="replace")
        if "Address already in use" not in said or attempt == 2:
            raise RuntimeError(f"mosquitto did not start with the shipped config: {said}")
    try:
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
         "--http", "127.0.0.1:0"],
        _daemon_env(shipped_broker.tls("fedge-coordinator-main"), coord_dir),
        coord_dir / "coordinator.log",
    )  # fmt: skip
    agent_env = _daemon_env(shipped_broker.tls("edge-0001"), agent_dir)
    # The shipped socket, /run/fedge-agent/agent.sock, is the unit's: in the data dir here.
    agent_env["FEDGE_INFERENCE_LISTEN"] = ""
    agent = Daemon(
        ["-m", "agent", "--config", str(PACKAGING / "agent.toml"), "--device-id", "edge-0001"],
        agent_env,
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
