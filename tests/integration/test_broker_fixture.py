"""The test broker itself: a port taken between choosing it and binding it is not a failure."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cloud_coordinator.broker import wait_for_port
from tests.broker import Mosquitto
from tests.pki import TestCA

pytestmark = pytest.mark.integration


def test_a_first_start_moves_off_a_port_taken_meanwhile(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", TestCA(tmp_path / "pki"))
    broker.directory.mkdir(parents=True)
    with socket.socket() as squatter:
        squatter.bind((broker.host, broker.port))
        squatter.listen()
        taken = broker.port
        broker.start()
        try:
            assert broker.port != taken
            assert wait_for_port(broker.host, broker.port, 5, broker.process)
            broker.stop()
            broker.port = taken  # a restart keeps its ports, so it fails on a taken one
            with pytest.raises(RuntimeError, match="Address already in use"):
                broker.start()
        finally:
            broker.stop()
