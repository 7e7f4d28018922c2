"""The agent daemon: presence, telemetry and commands over one MQTT session.

On connect it publishes a retained ``online`` status; its Last Will is a retained
``offline`` status for the same session, so the fleet sees a crash within 1.5 keepalives.
On `request_stop` (SIGTERM) it publishes ``offline`` itself, disconnects cleanly and
returns 0.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from agent import commands, systemd
from agent.config import AgentConfig
from agent.lifecycle import Event, Lifecycle, State
from agent.telemetry import HealthProbe
from protocols import __version__
from protocols.errors import DecodeError
from protocols.messages import (
    OFFLINE,
    ONLINE,
    Ack,
    BlobChunk,
    Command,
    Deployment,
    InferenceResponse,
    ModelManifest,
    Status,
    Telemetry,
    TrainTask,
    decode_as,
    encode,
)
from protocols.mqtt import (
    InboundMessage,
    MqttClient,
    MqttError,
    NotConnectedError,
    Will,
    settings_from_config,
)
from protocols.topics import (
    DeviceChannel,
    DeviceTopic,
    ModelChannel,
    ModelTopic,
    device_topic,
    parse_topic,
)

if TYPE_CHECKING:
    from agent.deployer import Deployer
    from agent.inference_service import InferenceService
    from agent.learning import Learner
    from agent.trust import ManifestTrust

log = logging.getLogger(__name__)
SHUTDOWN_PUBLISH_TIMEOUT_S = 2.0


def missing_torch_warning(train: bool) -> str | None:
    """Why every training task will fail, when `train` is on but torch cannot be found.

    Looked up, never imported (the daemon stays small; only the training child loads it),
    in this interpreter's path: the training child runs the same interpreter.
    """
    if not train or importlib.util.find_spec("torch") is not None:
        return None
    return (
        "train = true, but torch is not installed for this Python: every training task will"
        " fail (the training worker dies at start). Install the train extra"
        " (pip install 'fedge[train]'; with the fedge-agent package see \"Training on a"
        ' device" in /usr/share/doc/fedge-agent/operations.md), or set train = false so the'
        " coordinator stops selecting this device"
    )


class Agent:
    """One device's daemon; `run` blocks until `request_stop`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.session_ts = time.time()
        self.lifecycle = Lifecycle()
        self.health = HealthProbe()
        self.telemetry_sent = 0
        self.rejected_by_reason: Counter[str] = Counter()  # (telemetry: message_rejected_*)
        self.commands = commands.CommandLog(Path(config.data_dir) / "commands.seen")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        dev = config.device_id
        self._status_topic = device_topic(dev, DeviceChannel.STATUS)
        self._telemetry_topic = device_topic(dev, DeviceChannel.TELEMETRY)
        self._cmd_topic = device_topic(dev, DeviceChannel.CMD)
        self._ack_topic = device_topic(dev, DeviceChannel.ACK)
        will = Will(
            self._status_topic, self._status(OFFLINE, "connection lost"), qos=1, retain=True
        )
        self.mqtt = MqttClient(
            settings_from_config(config.mqtt, client_id=dev, will=will),
            on_message=self._on_message,
            on_connection=self._on_connection,
        )
        self.mqtt.subscribe(self._cmd_topic, qos=1)
        self.learner: Learner | None = None
        self.inference: InferenceService | None = None
        self.deployer: Deployer | None = None
        self.trust: ManifestTrust | None = None
        data_dir = Path(config.data_dir)
        dataset_dir = Path(config.dataset_dir or data_dir / "data")
        if config.train or config.inference:
            # onnxruntime and the model cache: only when training or serving
            from agent.learning import Learner
            from agent.trust import ManifestTrust

            self.trust = ManifestTrust(
                config.trusted_keys, data_dir, allow_unsigned=config.allow_unsigned_models
            )
            if config.inference:
                from agent.inference_service import InferenceService
                from agent.model_store import ModelStore

                store = ModelStore(data_dir / "models")
                self.inference = InferenceService(config, store, dataset_dir)
                self.inference.trust = self.trust
            self.learner = Learner(
                dev,
                data_dir,
                dataset_dir,
                self.mqtt,
                config.mqtt.max_payload_bytes,
                trust=self.trust,
                train_nice=config.train_nice,
                listener=self.inference,
            )
            channels = [DeviceChannel.BLOB]
            if self.inference is not None:
                from agent.deploy_sequence import DeploySequence
                from agent.deployer import Deployer

                self.deployer = Deployer(dev, self.learner.store, self.trust, self.learner,
                                         self.inference, self.mqtt,
                                         DeploySequence(data_dir))  # fmt: skip
                self.learner.blob_listener = self.deployer
                channels.append(DeviceChannel.DEPLOY)
                if config.offload:
                    from agent.offload import Offloader

                    self.inference.offloader = Offloader(dev, self.mqtt, config, dataset_dir)
                    channels.append(DeviceChannel.INFER_RESPONSE)
            if config.train:
                channels += [DeviceChannel.TASK, DeviceChannel.UPDATE_ACK]
            for channel in channels:
                self.mqtt.subscribe(device_topic(dev, channel), qos=1)
            if config.inference_model:
                self.learner.watch(config.inference_model)

    def _status(self, state: str, reason: str = "") -> bytes:
        c = self.config
        return encode(Status(c.device_id, state, self.session_ts, __version__, reason, c.fleet))

    def _event(self, event: Event) -> State:
        with self._lock:
            return self.lifecycle.apply(event)

    # --- callbacks from the MQTT thread ------------------------------------------------
    def _on_connection(self, up: bool) -> None:
        state = self._event(Event.UP if up else Event.DOWN)
        if up and state is State.ONLINE:
            self.mqtt.publish(self._status_topic, self._status(ONLINE), qos=1, retain=True)
            if self.learner is not None:
                self.learner.on_connected()
            systemd.notify(f"STATUS=online via {self.config.mqtt.host}")
            log.info("online as %s", self.config.device_id)
        elif state is State.RECONNECTING:
            systemd.notify("STATUS=offline, reconnecting")
            log.warning("broker connection lost; working offline until it is back")

    def _on_message(self, message: InboundMessage) -> None:
        cap = self.config.mqtt.max_payload_bytes
        try:
            topic = parse_topic(message.topic)
            if isinstance(topic, DeviceTopic) and topic.channel is DeviceChannel.CMD:
                self._on_command(decode_as(Command, message.payload, cap))
            elif self.learner is None:
                raise DecodeError(
                    f"training is off; ignoring {message.topic}", reason="unsupported"
                )
            elif isinstance(topic, ModelTopic) and topic.channel is ModelChannel.MANIFEST:
                self.learner.on_manifest(decode_as(ModelManifest, message.payload, cap))
            elif isinstance(topic, DeviceTopic) and topic.channel is DeviceChannel.TASK:
                self.learner.on_task(decode_as(TrainTask, message.payload, cap))
            elif isinstance(topic, DeviceTopic) and topic.channel is DeviceChannel.BLOB:
                self.learner.on_chunk(decode_as(BlobChunk, message.payload, cap))
            elif isinstance(topic, DeviceTopic) and topic.channel is DeviceChannel.UPDATE_ACK:
                self.learner.on_update_ack(decode_as(Ack, message.payload, cap))
            elif (
                isinstance(topic, DeviceTopic)
                and topic.channel is DeviceChannel.DEPLOY
                and self.deployer is not None
            ):
                self.deployer.on_deploy(decode_as(Deployment, message.payload, cap))
            elif (
                isinstance(topic, DeviceTopic)
                and topic.channel is DeviceChannel.INFER_RESPONSE
                and self.inference is not None
                and self.inference.offloader is not None
            ):
                response = decode_as(InferenceResponse, message.payload, cap)
                self.inference.offloader.on_response(response, message.correlation)
            else:
                raise DecodeError(f"nothing handles {message.topic}", reason="unsupported")
        except DecodeError as exc:
            with self._lock:
                self.rejected_by_reason[exc.reason] += 1
            log.warning("rejected message on %s (%s): %s", message.topic, exc.reason, exc)

    def _on_command(self, command: Command) -> None:
        duplicate = self.commands.seen(command.cmd_id)
        if duplicate:  # delivered again (QoS 1): acknowledged, not run twice
            ok, reason = True, ""
        else:
            ok, reason = self._execute(command)
            if ok:  # (a refused one is judged again if it comes again)
                self.commands.add(command.cmd_id)
        ack = Ack(command.cmd_id, ok, time.time(), reason, duplicate)
        try:
            self.mqtt.publish(self._ack_topic, encode(ack), qos=1)
        except MqttError as exc:
            log.warning("could not acknowledge command %s: %s", command.cmd_id, exc)

    def _execute(self, command: Command) -> tuple[bool, str]:
        refused = commands.refusal(command, time.time())
        if refused is not None:
            return False, refused
        if command.action == "ping":
            return True, ""
        if command.action == "telemetry":
            self._publish_telemetry()
            return True, ""
        if command.action == "rollback":
            return self._rollback()
        return False, f"unknown action {command.action!r}"

    def _rollback(self) -> tuple[bool, str]:
        if self.inference is None:
            return False, "inference is off"
        from agent.predictions import ModelUnavailableError

        try:
            self.inference.rollback()
        except ModelUnavailableError as exc:
            return False, str(exc)
        self._publish_telemetry()  # the fleet sees the version change at once
        return True, ""

    # --- main loop ---------------------------------------------------------------------
    def _publish_telemetry(self) -> None:
        h = self.health.sample()
        with self._lock:
            self.telemetry_sent += 1
            seq = self.telemetry_sent
        message = Telemetry(
            device_id=self.config.device_id,
            ts=time.time(),
            seq=seq,
            uptime_s=round(self.health.uptime_s(), 3),
            cpu_percent=h.cpu_percent,
            mem_rss_bytes=h.mem_rss_bytes,
            mem_available_bytes=h.mem_available_bytes,
            load1=h.load1,
            agent_version=__version__,
            queue_depth=self.learner.outbox.depth() if self.learner else 0,
            extra=self._extra(),
            model_versions=self._model_versions(),
        )
        try:
            self.mqtt.publish(self._telemetry_topic, encode(message), qos=0)
        except NotConnectedError:
            log.debug("offline: telemetry %d skipped", seq)

    @property
    def messages_rejected(self) -> int:
        """Messages refused so far, every reason together."""
        with self._lock:
            return sum(self.rejected_by_reason.values())

    def _extra(self) -> dict[str, float]:
        extra = {"train": 1.0 if self.config.train else 0.0}
        with self._lock:
            extra.update({f"message_rejected_{r}": float(n)
                          for r, n in self.rejected_by_reason.items()})  # fmt: skip
        if self.learner is not None:
            extra["outbox_dropped"] = float(self.learner.outbox.dropped)
            extra["outbox_set_aside"] = float(self.learner.outbox.set_aside is not None)
        if self.trust is not None:
            extra.update(self.trust.telemetry_extra())
        if self.deployer is not None:
            extra["deploy_sequence_reset"] = float(self.deployer.sequence.resets)
        if self.inference is not None:
            extra.update(self.inference.telemetry_extra())
        # (a NaN or Inf would make the whole message invalid: the rest still goes)
        return {k: v for k, v in extra.items() if math.isfinite(v)}

    def _model_versions(self) -> dict[str, str]:
        versions = self.learner.model_versions() if self.learner else {}
        if self.inference is not None:
            versions.update(self.inference.served_versions())  # the version it serves
        return versions

    def request_stop(self) -> None:
        """Ask `run` to shut down cleanly (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> int:
        """Connect, then publish telemetry until stopped; return the exit status (0)."""
        self._event(Event.CONNECT)
        log.info(
            "fedge-agent %s starting: device %s, broker %s:%d",
            __version__,
            self.config.device_id,
            self.config.mqtt.host,
            self.config.mqtt.port,
        )
        warning = missing_torch_warning(self.config.train)
        if warning is not None:
            log.warning("%s", warning)
        if self.learner is not None:
            self.learner.start()
        if self.inference is not None:
            self.inference.start()
        self.mqtt.start()
        # Started as far as systemd is concerned; being offline is a state, not a failure.
        systemd.notify(f"READY=1\nSTATUS=connecting to {self.config.mqtt.host}")
        watchdog = systemd.watchdog_interval_s()
        interval = self.config.telemetry_interval_s
        tick = min(interval, watchdog) if watchdog else interval
        next_telemetry = time.monotonic() + min(1.0, interval)
        while not self._stop.wait(max(0.0, min(tick, next_telemetry - time.monotonic()))):
            if watchdog:
                systemd.notify("WATCHDOG=1")
            if time.monotonic() >= next_telemetry:
                if self.mqtt.connected:
                    self._publish_telemetry()
                next_telemetry = time.monotonic() + interval
        return self._shutdown()

    def _shutdown(self) -> int:
        self._event(Event.STOP)
        systemd.notify("STOPPING=1\nSTATUS=shutting down")
        if self.mqtt.connected:
            try:
                handle = self.mqtt.publish(
                    self._status_topic, self._status(OFFLINE, "shutdown"), qos=1, retain=True
                )
                if not handle.wait(SHUTDOWN_PUBLISH_TIMEOUT_S):
                    log.warning("broker did not confirm the offline status in time")
            except MqttError as exc:
                log.warning("could not publish the offline status: %s", exc)
        self.mqtt.stop()
        if self.inference is not None:
            self.inference.stop()
        if self.learner is not None:
            self.learner.stop()
        self._event(Event.DONE)
        log.info("stopped")
        return 0
