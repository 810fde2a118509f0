"""Serving one service: grpc.aio with health, reflection, tracing, and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.telemetry import client_interceptors, server_interceptors

log = logging.getLogger(__name__)

# Voice prompts ride in the public request (up to 4 x 10 MB); tensors between services can be large too.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted service is found again within two seconds (gRPC's default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=client_interceptors())


class Service:
    """A grpc.aio server for one service's servicers, with the standard health and reflection services."""

    def __init__(self, name: str, host: str, port: int, service_names: list[str]) -> None:
        self.name = name
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=server_interceptors())
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.draining = False

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(self, grace_s: float = 30.0, on_drain: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then drain: NOT_SERVING, refuse new calls, let running ones finish."""
        await self.server.start()
        await self.set_serving(True)
        log.info("%s serving on port %d", self.name, self.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s draining (grace %.0f s)", self.name, grace_s)
        self.draining = True
        await self.set_serving(False)
        if on_drain:
            on_drain()
        await self.server.stop(grace_s)
        log.info("%s stopped", self.name)
