"""HTTPS requests to an Envoy listener in the background, as a test reads them afterwards."""

from __future__ import annotations

from tests.harness.chaos import Traffic
from tests.harness.tlsclient import HttpsClient


class ClientLoop:
    """:class:`Traffic` every 0.05 s, read without the times: ``failures`` (the
    errors) and ``serials`` (each new serial presented)."""

    def __init__(self, client: HttpsClient, port: int) -> None:
        self.traffic = Traffic(client, port, interval=0.05)

    @property
    def interval(self) -> float:
        return self.traffic.interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        self.traffic.interval = seconds

    @property
    def ok(self) -> int:
        return self.traffic.ok

    @property
    def failures(self) -> list[str]:
        return [error for _, error in self.traffic.failures]

    @property
    def serials(self) -> list[int]:
        return [serial for _, serial in self.traffic.served]

    def start(self) -> ClientLoop:
        self.traffic.start()
        return self

    def stop(self) -> None:
        self.traffic.stop()
