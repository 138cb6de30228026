"""sd_notify client: socket addresses, watchdog interval, messages on a real datagram socket."""

from __future__ import annotations

import logging
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_agent.errors import ConfigError
from pacs_agent.notify import Notifier, Watchdog, socket_address, watchdog_interval
from pacs_agent.service import cuda_devices_for_instance


class FakeSystemd:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, *, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"pacs-agent-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
            self._dir: tempfile.TemporaryDirectory[str] | None = None
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="notify-", dir="/tmp")  # short: sun_path <= 107
            path = str(Path(self._dir.name) / "n.sock")
            self.sock.bind(path)
            self.address = path
        self.sock.settimeout(5)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            self._dir.cleanup()


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(abstract=request.param == "abstract")
    yield fake
    fake.close()


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract/name") == b"\0abstract/name"
    with pytest.raises(ValueError, match="neither an absolute path nor an abstract socket"):
        socket_address("relative/path")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "999"}, None),  # the watchdog of another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_seconds is None
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


def test_messages_arrive_as_datagrams(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "2000000"})
    assert notifier.enabled
    assert notifier.watchdog_seconds == 1.0
    assert notifier.ready("listening on 0.0.0.0:11112")
    assert systemd.receive() == "READY=1\nSTATUS=listening on 0.0.0.0:11112"
    assert notifier.watchdog()
    assert systemd.receive() == "WATCHDOG=1"
    assert notifier.status("two\nlines")
    assert systemd.receive() == "STATUS=two lines"
    assert notifier.stopping()
    assert systemd.receive() == "STOPPING=1"


def test_unreachable_socket_is_logged_once_and_ignored(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="pacs_agent.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


def test_watchdog_pings_only_while_alive(systemd: FakeSystemd) -> None:
    alive = {"value": True}
    notifier = Notifier(systemd.address, watchdog_seconds=0.05)
    watchdog = Watchdog(notifier, lambda: alive["value"])
    watchdog.start()
    try:
        assert [systemd.receive() for _ in range(3)] == ["WATCHDOG=1"] * 3
        alive["value"] = False
        time.sleep(0.2)  # let a ping already on its way arrive, then drain
        systemd.sock.settimeout(0.01)
        try:
            while systemd.receive():
                pass
        except TimeoutError:
            pass
        systemd.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            systemd.receive()
        alive["value"] = True
        systemd.sock.settimeout(5)
        assert systemd.receive() == "WATCHDOG=1"
    finally:
        watchdog.stop()


def test_watchdog_without_watchdog_sec_starts_nothing(systemd: FakeSystemd) -> None:
    watchdog = Watchdog(Notifier(systemd.address, watchdog_seconds=None), lambda: True)
    watchdog.start()
    systemd.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        systemd.receive()
    watchdog.stop()


@pytest.mark.parametrize(
    ("instance", "devices"),
    [("0", "0"), ("3", "3"), ("gpu1", "1"), ("0,1", "0,1"), ("cpu0", ""), ("CPU", ""), ("cpu-batch", "")],
)
def test_worker_instance_selects_cuda_devices(instance: str, devices: str) -> None:
    assert cuda_devices_for_instance(instance) == devices


@pytest.mark.parametrize("instance", ["", "gpu", "tpu0", "0;rm", "../0"])
def test_bad_worker_instance_is_refused(instance: str) -> None:
    with pytest.raises(ConfigError, match="a worker instance is a GPU index"):
        cuda_devices_for_instance(instance)
