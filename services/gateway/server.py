"""The public TextToSpeech API: checks a request, fans it out to the mesh, and streams encoded audio back."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid

import grpc
from vibevoice.mesh.v1 import mesh_pb2
from vibevoice.tts.v1 import jobs_pb2, tts_pb2, tts_pb2_grpc

from services.common.errors import RequestError, abort, from_rpc_error
from services.common.grpc_server import Service
from services.common.logs import escape, setup_logging
from services.common.memory import LARGE_REQUEST_BYTES, Trimmer
from services.common.telemetry import mark, setup_tracing
from services.common.wire_arrays import as_numpy
from services.gateway.admission import Admission, Room
from services.synthesis.backends import Backends, api_key, decode_voices
from services.synthesis.estimates import estimated_positions
from services.synthesis.options import MAX_REQUEST_ID_CHARS, Options, check_options
from services.synthesis.responses import Responses
from services.synthesis.segments import Finished, Progress, run_segments

log = logging.getLogger(__name__)


class Gateway(tts_pb2_grpc.TextToSpeechServicer):
    def __init__(self, text_parser: str, acoustic: str, llm: str, queue_size: int, max_queue_wait: float) -> None:
        self.backends = Backends(text_parser, acoustic, llm)
        self.admission = Admission(self._llm_room, queue_size, max_queue_wait)
        self.trimmer = Trimmer()

    async def _llm_room(self) -> Room:
        capacity = await self.backends.capacity()
        return Room(capacity.slots, capacity.kv_pages * capacity.page_size, capacity.max_positions)

    async def Synthesize(self, request, context: grpc.aio.ServicerContext):  # noqa: N802
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        key = api_key(context)
        admitted = None
        refused: RequestError | None = None
        try:
            options = check_options(request)
            try:
                cost = estimated_positions(request, self.admission.room.stream_positions)
                admitted = await self.admission.acquire(key, cost)
                mark("admitted")
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e, f"llm service at {self.backends.addresses['llm']}") from e
            async for response in self._synthesize(request, options, request_id, started, context):
                yield response
        except RequestError as e:
            # The id is the client's and may be the reason for the refusal: bounded and escaped in the log.
            log.info("request %s: %s", escape(request_id, max_chars=MAX_REQUEST_ID_CHARS), e.status.message)
            # Abort after the except block: the traceback would keep the request (voices of up to 40 MB)
            # alive in a reference cycle until a full garbage collection.
            refused = RequestError(e.status)
        finally:
            if admitted is not None:
                self.admission.release(key, cost, admitted)
            if sum(len(v.audio) for v in request.voices) >= LARGE_REQUEST_BYTES:
                self.trimmer.due = True
        if refused is not None:
            await abort(context, refused)

    async def _synthesize(self, request, options: Options, request_id: str, started: float, context):
        voices = await asyncio.to_thread(decode_voices, request)
        mark("voices read")
        prepared = await self.backends.prepare(request, options, request_id, voices, context.time_remaining())
        responses = Responses(prepared.header, options.encoder, started)
        header_sent = False
        async for event in run_segments(self.backends, prepared, options, voices, context.time_remaining):
            if isinstance(event, Progress):
                # The llm reports its prompt read once, after admission: errors before it reach the
                # client as a status with no header.
                if not header_sent:
                    header_sent = True
                    yield tts_pb2.SynthesizeResponse(header=prepared.header)
                responses.prompt_tokens_done = event.prompt_tokens_done
                yield responses.progress(event.prompt_tokens_done)
            elif isinstance(event, mesh_pb2.GeneratedFrame):
                samples = as_numpy(event.audio)
                for response in responses.frame(event.index, event.segment_index, samples):
                    yield response
            elif isinstance(event, Finished):
                for response in responses.finish(event.finish_reason):
                    yield response


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vvmesh serve gateway")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--text-parser", default="127.0.0.1:50062")
    p.add_argument("--acoustic", default="127.0.0.1:50063")
    p.add_argument("--llm", default="127.0.0.1:50064")
    p.add_argument("--queue-size", type=int, default=32, help="requests that may wait for room on the llm")
    p.add_argument(
        "--max-queue-wait",
        type=float,
        default=50.0,
        help="seconds a request may wait for room (under Envoy's 60 s stream idle timeout)",
    )
    p.add_argument("--drain-grace", type=float, default=120.0, help="seconds running streams get after SIGTERM")
    args = p.parse_args(argv)
    setup_logging("gateway")
    setup_tracing("gateway")

    async def run() -> None:
        # Envoy sends the Jobs calls to the jobs service and reflection here: described here too, so grpcurl
        # through Envoy knows the whole public API.
        service = Service(
            "gateway",
            args.host,
            args.port,
            [tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name],
            also_reflected=[jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name],
        )
        gateway = Gateway(args.text_parser, args.acoustic, args.llm, args.queue_size, args.max_queue_wait)
        tts_pb2_grpc.add_TextToSpeechServicer_to_server(gateway, service.server)
        background = [
            asyncio.create_task(gateway.admission.refresh_loop()),
            asyncio.create_task(gateway.trimmer.loop()),
        ]
        await service.run(grace_s=args.drain_grace)
        for task in background:
            task.cancel()

    asyncio.run(run())


if __name__ == "__main__":
    main()
