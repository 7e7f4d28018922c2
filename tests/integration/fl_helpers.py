"""Helpers for the federated-learning integration tests: device data, agents, jobs over the
HTTP API, and a spy MQTT client that records (and can forge) device traffic."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import numpy as np

from cloud_coordinator.datasets import prepare_fleet
from cloud_coordinator.templates import get_template
from protocols.messages import Ack, ModelUpdate, Status, TrainTask, decode_as, encode
from protocols.model_format import head_shapes
from protocols.mqtt import InboundMessage, MqttClient, settings_from_config
from protocols.tensors import encode_dense
from protocols.topics import DeviceChannel, all_devices_filter, device_topic, parse_topic
from tests.broker import Mosquitto
from tests.procs import Agent, Coordinator, Daemon, wait_until

TEMPLATE = "digits_mlp"


def prepare_data(tmp_path: Path, n: int, scheme: str = "iid", seed: int = 0) -> list[Path]:
    """Per-device train.npz/val.npz for `n` devices (agent-01 ..), as `prepare_fleet` writes."""
    return prepare_fleet(get_template(TEMPLATE), n, scheme, 0.5, seed, tmp_path / "fleet")


def start_agents(
    mosquitto: Mosquitto, tmp_path: Path, data: list[Path], *flags: str
) -> list[Agent]:
    """One training agent per data directory, named after it (`flags` added to each)."""
    env = mosquitto.env()
    return [
        Agent(d.name, tmp_path / "agents" / d.name, env, "--dataset-dir", str(d), *flags)
        for d in data
    ]


def wait_online(coordinator: Coordinator, device_ids: list[str], timeout: float = 30) -> None:
    """Wait until the registry shows every device in `device_ids` online."""

    def all_online() -> bool:
        devices = coordinator.devices()
        return all(d in devices and devices[d].online for d in device_ids)

    wait_until(all_online, timeout, interval=0.1)


def stop_all(*daemons: Daemon) -> None:
    """Stop daemons together (SIGCONT, then SIGTERM to all, then wait; SIGKILL stragglers)."""
    alive = [d for d in daemons if d.process.poll() is None]
    for daemon in alive:
        daemon.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        daemon.signal(signal.SIGTERM)
    for daemon in alive:
        try:
            daemon.process.wait(15)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()


@contextmanager
def fleet(
    mosquitto: Mosquitto, tmp_path: Path, data: list[Path], *agent_flags: str
) -> Iterator[tuple[Coordinator, list[Agent]]]:
    """A coordinator and one agent per data directory, started together, all online;
    every process is stopped when the block ends, whatever happens."""
    coordinator = Coordinator(tmp_path / "coordinator", mosquitto.env())
    agents = start_agents(mosquitto, tmp_path, data, *agent_flags)
    try:
        coordinator.wait_connected(30)
        wait_online(coordinator, [d.name for d in data])
        yield coordinator, agents
    finally:
        stop_all(*agents, coordinator)


def job_spec(job_id: str, **fields: object) -> dict[str, object]:
    """A small, fast job spec (a few seconds per round on two cores); `fields` override."""
    spec: dict[str, object] = {
        "job_id": job_id,
        "template": TEMPLATE,
        "rounds": 3,
        "devices_per_round": 3,
        "round_deadline_s": 60.0,
        "max_train_seconds": 10.0,
        "epochs": 2,
        "lr": 0.05,
    }
    spec.update(fields)
    return spec


def start_job(coordinator: Coordinator, spec: dict[str, object]) -> dict[str, Any]:
    """POST the job like a user would; return the created job."""
    status, body = coordinator.post("/v1/jobs", spec)
    assert status == 201, body
    assert body["state"] == "running", body
    return dict(body)


def get_job(coordinator: Coordinator, job_id: str) -> dict[str, Any]:
    """GET /v1/jobs/{id}."""
    return dict(coordinator.get(f"/v1/jobs/{job_id}"))


def rounds_done(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's rounds that are done, in order."""
    return [r for r in job["rounds"] if r["state"] == "done"]


def wait_job(coordinator: Coordinator, job_id: str, timeout: float) -> dict[str, Any]:
    """Wait until the job leaves `running`; return it (whatever state it ended in)."""

    def finished() -> dict[str, Any] | None:
        job = get_job(coordinator, job_id)
        return job if job["state"] != "running" else None

    try:
        return wait_until(finished, timeout, interval=0.2)
    except AssertionError:
        job = get_job(coordinator, job_id)
        summary = [(r["round"], r["state"], r["selected"]) for r in job["rounds"]]
        raise AssertionError(f"job {job_id} still running after {timeout}s: {summary}") from None


def wait_rounds_done(
    coordinator: Coordinator, job_id: str, n: int, timeout: float
) -> dict[str, Any]:
    """Wait until at least `n` rounds of the job are done; return the job."""

    def enough() -> dict[str, Any] | None:
        job = get_job(coordinator, job_id)
        return job if len(rounds_done(job)) >= n else None

    return wait_until(enough, timeout, interval=0.1)


def zero_update(device_id: str, job_id: str, round_no: int, base_version: str) -> ModelUpdate:
    """A well-formed update with an all-zero delta, as a device without an agent sends it."""
    shapes = head_shapes(get_template(TEMPLATE).head_layers)
    tensors = tuple(encode_dense(n, np.zeros(s, dtype=np.float32)) for n, s in shapes.items())
    return ModelUpdate(device_id, job_id, round_no, base_version, 1, 100, tensors)


def child_pids(pid: int) -> list[int]:
    """The direct children of process `pid` (from /proc; empty once it is gone)."""
    children: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return children


class Spy:
    """A plain-listener MQTT client that records device traffic and can publish as anyone.

    Anonymous clients have full access on the test broker's plain listener, so this client
    sees every device's updates and acknowledgements and can forge a device's messages.
    """

    def __init__(self, mosquitto: Mosquitto, client_id: str = "spy") -> None:
        self._lock = threading.Lock()
        self._messages: list[InboundMessage] = []
        settings = settings_from_config(mosquitto.broker_config(), client_id)
        self.client = MqttClient(settings, self._on_message)
        for channel in (DeviceChannel.UPDATE, DeviceChannel.UPDATE_ACK, DeviceChannel.TASK):
            self.client.subscribe(all_devices_filter(channel), qos=1)
        self._stop = threading.Event()
        self._responder: threading.Thread | None = None
        self._answered: set[tuple[str, int]] = set()
        self.holding: Callable[[TrainTask], bool] = lambda task: False

    def __enter__(self) -> Self:
        self.client.start()
        self.client.wait_connected(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._responder is not None:
            self._responder.join(10)
        self.client.stop()

    def _on_message(self, message: InboundMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def _on(self, channel: DeviceChannel) -> list[tuple[str, bytes]]:
        with self._lock:
            messages = list(self._messages)
        found = []
        for m in messages:
            topic = parse_topic(m.topic)
            if getattr(topic, "channel", None) is channel:
                found.append((getattr(topic, "device_id", ""), m.payload))
        return found

    def all_updates(self, job_id: str, round_no: int) -> list[tuple[str, bytes]]:
        """Every update sent for one round, in order, as (device, payload)."""
        found = []
        for device_id, payload in self._on(DeviceChannel.UPDATE):
            update = decode_as(ModelUpdate, payload, 1 << 30)
            if update.job_id == job_id and update.round == round_no:
                found.append((device_id, payload))
        return found

    def updates(self, job_id: str, round_no: int) -> dict[str, bytes]:
        """The first update payload each device sent for one round, by device."""
        first: dict[str, bytes] = {}
        for device_id, payload in self.all_updates(job_id, round_no):
            first.setdefault(device_id, payload)
        return first

    def acks(self, device_id: str) -> list[Ack]:
        """Every update acknowledgement the coordinator sent to `device_id`, in order."""
        return [decode_as(Ack, p, 1 << 20) for d, p in self._on(DeviceChannel.UPDATE_ACK)
                if d == device_id]  # fmt: skip

    def wait_ack(self, device_id: str, ref: str, timeout: float = 10) -> list[Ack]:
        """Wait for acknowledgements of `ref` to `device_id`; return all of them so far."""
        return wait_until(lambda: [a for a in self.acks(device_id) if a.ref == ref], timeout)

    def publish(self, device_id: str, channel: DeviceChannel, payload: bytes) -> None:
        """Publish on a device's topic as if it were that device (QoS 1, waits for PUBACK)."""
        handle = self.client.publish(device_topic(device_id, channel), payload, qos=1)
        assert handle.wait(10), "the broker did not acknowledge the publish"

    def tasks(self, device_id: str) -> list[TrainTask]:
        """Every task the coordinator sent to `device_id`, in order."""
        return [decode_as(TrainTask, p, 1 << 20) for d, p in self._on(DeviceChannel.TASK)
                if d == device_id]  # fmt: skip

    def answer(self, task: TrainTask, device_id: str) -> bytes:
        """Send `device_id`'s answer to `task`: an all-zero delta; return the payload."""
        update = zero_update(device_id, task.job_id, task.round, task.base_version)
        payload = encode(update)
        self.publish(device_id, DeviceChannel.UPDATE, payload)
        return payload

    def simulate(self, device_id: str) -> None:
        """Play `device_id`, a device with no agent: it goes online, and a responder thread
        (polling every 50 ms, like a device checking for work) answers each round's task
        once, unless `holding(task)` is true; a held round is answered once it is not."""
        self.announce_online(device_id)

        def respond() -> None:
            while not self._stop.wait(0.05):
                for task in self.tasks(device_id):
                    key = (task.job_id, task.round)
                    if key not in self._answered and not self.holding(task):
                        self.answer(task, device_id)
                        self._answered.add(key)

        self._responder = threading.Thread(target=respond, name=f"sim-{device_id}", daemon=True)
        self._responder.start()

    def announce_online(self, device_id: str) -> None:
        """Make a device with no agent behind it look online to the coordinator."""
        status = Status(device_id, "online", time.time(), "test")
        handle = self.client.publish(
            device_topic(device_id, DeviceChannel.STATUS), encode(status), qos=1, retain=True
        )
        assert handle.wait(10)
