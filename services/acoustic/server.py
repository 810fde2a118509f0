"""Acoustic service: voice prompts to embeddings, and the per-step rendering stream from the llm."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import torch
from google.rpc import code_pb2
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.acoustic.engine import AcousticEngine
from services.common.audio import MAX_VOICE_SECONDS, SAMPLE_RATE
from services.common.checked_tensors import checked_rows
from services.common.checkpoint import resolve_checkpoint
from services.common.errors import RequestError, abort, invalid_argument, status_error, unavailable
from services.common.grpc_server import Service
from services.common.limits import MAX_VOICES
from services.common.logs import mark_random_weights, setup_logging
from services.common.model_args import add_model_args, resolve_dtype
from services.common.model_info import model_info
from services.common.step_stats import StepStats
from services.common.telemetry import setup_tracing
from services.common.tensors import from_proto, to_proto
from services.common.wire_arrays import array_proto
from services.render.audio_out import AudioRouter, Gathered, checked_key
from services.render.shared_memory import AcousticSharedMemory
from services.render.values import RenderStep

log = logging.getLogger(__name__)


def _key(conn: int, stream_id: int) -> int:
    # Stream ids are the llm's; they are made unique per connection so several llm replicas can share us.
    return (conn << 40) | stream_id


def checked_voices(request: mesh_pb2.EncodeVoiceRequest) -> list[torch.Tensor]:
    """Voice prompts as the gateway prepares them (24 kHz mono samples, at most a minute each), or why not."""
    if not 1 <= len(request.voices) <= MAX_VOICES:
        raise invalid_argument("voices", f"{len(request.voices)} voices; 1 to {MAX_VOICES}")
    longest = int(MAX_VOICE_SECONDS * SAMPLE_RATE)
    voices = []
    for i, message in enumerate(request.voices):
        try:
            v = from_proto(message)
        except (ValueError, RuntimeError) as e:
            raise invalid_argument(f"voices[{i}]", f"not a tensor: {e}") from e
        if v.dim() != 1 or not 1 <= v.numel() <= longest:
            raise invalid_argument(f"voices[{i}]", f"shape {tuple(v.shape)}; one channel of 1 to {longest} samples")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise invalid_argument(f"voices[{i}]", "samples must be finite floating-point values")
        voices.append(v.float())
    return voices


DIGEST_BYTES = 32  # SHA-256


def checked_digests(request: mesh_pb2.EncodeVoiceRequest) -> list[bytes]:
    """Voices given by the digests of their samples (EncodeVoiceRequest.voice_digests), or why not."""
    if request.voices:
        raise invalid_argument("voice_digests", "give voices or voice_digests, not both")
    if not 1 <= len(request.voice_digests) <= MAX_VOICES:
        raise invalid_argument("voice_digests", f"{len(request.voice_digests)} digests; 1 to {MAX_VOICES}")
    for i, digest in enumerate(request.voice_digests):
        if len(digest) != DIGEST_BYTES:
            raise invalid_argument(f"voice_digests[{i}]", f"{len(digest)} bytes; a SHA-256 digest has {DIGEST_BYTES}")
    return list(request.voice_digests)


# Frames of one stream: more than any model's context holds (a resumed stream's, or an EmbedFrames call's).
MAX_STREAM_FRAMES = 2**17


def check_resumed_starts(request: mesh_pb2.RenderRequest, engine: AcousticEngine) -> None:
    """A resumed stream's history must rebuild its state exactly: its latents' shape, and enough of them."""
    for i, start in enumerate(request.starts):
        if not start.frames_made and not start.HasField("replay_latents"):
            continue
        if start.frames_made > MAX_STREAM_FRAMES:
            raise invalid_argument(f"starts[{i}].frames_made", f"{start.frames_made}; at most {MAX_STREAM_FRAMES}")
        field = f"starts[{i}].replay_latents"
        latents = checked_rows(start.replay_latents, field, engine.latent_size)
        needed = min(start.frames_made, engine.replay_frames)
        if not needed <= latents.shape[0] <= start.frames_made:
            raise invalid_argument(
                field,
                f"{latents.shape[0]} frames for a stream resumed after {start.frames_made}; the decoder and semantic "
                f"state need the last {needed}",
            )


def check_audio_keys(request: mesh_pb2.RenderRequest) -> None:
    for i, start in enumerate(request.starts):
        if start.audio_key:
            checked_key(start.audio_key, f"starts[{i}].audio_key")


def checked_frames(request: mesh_pb2.EmbedFramesRequest, engine: AcousticEngine) -> tuple[torch.Tensor, torch.Tensor]:
    latents = checked_rows(request.latents, "latents", engine.latent_size)
    if latents.shape[0] > MAX_STREAM_FRAMES:
        raise invalid_argument("latents", f"{latents.shape[0]} frames; at most {MAX_STREAM_FRAMES} a call")
    semantic = checked_rows(request.semantic, "semantic", engine.semantic_size, latents.shape[0])
    return latents, semantic


class Acoustic(mesh_pb2_grpc.AcousticServicer):
    def __init__(self, engine: AcousticEngine, audio_out: AudioRouter | None = None) -> None:
        self.engine = engine
        self.audio_out = audio_out or AudioRouter()  # keyed streams' frames, for StreamAudio
        # Steps run one at a time, off the event loop. Voice encoding uses other weights and its own CUDA
        # stream, so a new request's voices never hold up the frames of streams already playing.
        self.lock = asyncio.Lock()
        self.encode_lock = asyncio.Lock()
        self._connections = itertools.count(1)
        self.stats = StepStats(log, "render step")
        self.draining = asyncio.Event()

    def drain(self) -> None:
        """SIGTERM: render streams end once no stream they started is left (`_requests`)."""
        self.draining.set()

    async def _requests(self, request_iterator: AsyncIterator, started: set[int]) -> AsyncIterator:
        """The llm's render requests until it closes the stream, or, once this service drains, until none of the
        streams it started here is left. An llm keeps its stream open while idle: that must not hold this
        service's exit for the whole grace period."""
        requests = aiter(request_iterator)
        while not (self.draining.is_set() and not started):
            if started:  # the llm sends a step for them soon
                request = await anext(requests, None)
            else:  # an idle llm may send nothing for hours
                read = asyncio.ensure_future(anext(requests, None))
                drained = asyncio.ensure_future(self.draining.wait())
                await asyncio.wait((read, drained), return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
                if not read.done():
                    read.cancel()
                    return
                request = read.result()
            if request is None:
                return
            yield request

    async def EncodeVoice(self, request, context):  # noqa: N802
        # Checked, encoded and answered off the event loop, which relays every stream's audio: four voices are
        # some 8 MB of samples in, their embeddings a few MB out. A bad request is answered at once, not after
        # the encodes queued before it.
        # Voices encoded before may come as their digests alone, sparing megabytes each way of the hop.
        try:
            if request.voice_digests:
                digests = checked_digests(request)
            else:
                voices = await asyncio.to_thread(checked_voices, request)
        except RequestError as e:
            await abort(context, e)
            return
        async with self.encode_lock:
            if request.voice_digests:
                answer = await asyncio.to_thread(self._encoded, self.engine.encode_cached_voices, digests, request.seed)
            else:
                answer = await asyncio.to_thread(self._encoded, self.engine.encode_voices, voices, request.seed)
        if isinstance(answer, int):
            reason = f"voice_digests[{answer}]: not in this service's voice cache; send the voice's samples"
            await abort(context, status_error(code_pb2.NOT_FOUND, reason))
            return
        return answer

    @staticmethod
    def _encoded(encode, voices, seed: int) -> mesh_pb2.EncodeVoiceResponse | int:
        """`encode(voices, seed)` answered as a message; an int (the index of a digest not held) passes through."""
        encoded = encode(voices, seed)
        if isinstance(encoded, int):
            return encoded
        embeddings, frames = encoded
        return mesh_pb2.EncodeVoiceResponse(embeddings=to_proto(embeddings), frames=frames)

    async def EmbedFrames(self, request, context):  # noqa: N802
        try:
            latents, semantic = checked_frames(request, self.engine)
        except RequestError as e:
            await abort(context, e)
            return
        async with self.encode_lock:
            # Copied to the host off the event loop, which the render streams' messages wait on.
            embeddings = await asyncio.to_thread(lambda: self.engine.embed_frames(latents, semantic).cpu())
        return mesh_pb2.EmbedFramesResponse(embeddings=to_proto(embeddings), replay_frames=self.engine.replay_frames)

    def _step(
        self, conn: int, request: mesh_pb2.RenderRequest, shared: AcousticSharedMemory | None
    ) -> tuple[mesh_pb2.RenderResponse, Gathered]:
        t0 = time.perf_counter()
        conditions = shared.conditions_for(len(request.stream_ids)) if request.stream_ids and shared else None
        step = RenderStep.from_proto(request, lambda s: _key(conn, s), conditions)
        t1 = time.perf_counter()
        result = self.engine.step(step)
        t2 = time.perf_counter()
        gathered = self.audio_out.gather(step, result)
        # A step whose every stream is keyed gives the llm only what it needs: the embeddings.
        response = mesh_pb2.RenderResponse(
            step=request.step, stream_ids=request.stream_ids, frames_routed=gathered.all_frames(step)
        )
        if step.ids and shared is not None:
            # the llm waits for it on the GPU, not here
            shared.publish((result.embeddings, result.audio, result.latents, result.semantic))
        else:
            result.fill(response, frames=not response.frames_routed)
        t3 = time.perf_counter()
        phases = {"unpack": (t1 - t0) * 1000, "render": (t2 - t1) * 1000, "pack": (t3 - t2) * 1000}
        self.stats.add(len(step.ids), phases, context=f" ({len(step.starts)} joining)")
        return response, gathered

    async def Render(self, request_iterator: AsyncIterator, context) -> AsyncIterator:  # noqa: N802
        conn = next(self._connections)
        started: set[int] = set()
        shared: AcousticSharedMemory | None = None
        undelivered: Gathered | None = None  # a step answered whose frames are not in their mailboxes yet
        log.info("render stream %d opened by %s", conn, context.peer())
        try:
            async for request in self._requests(request_iterator, started):
                if request.HasField("shared_offer"):
                    shared, why_not = await asyncio.to_thread(
                        AcousticSharedMemory.accept,
                        request.shared_offer,
                        self.engine.device,
                        self.engine.dtype,
                        (self.engine.latent_size, self.engine.semantic_size),
                    )
                    log.info("render stream %d: %s", conn, why_not or "tensors in shared GPU memory")
                    response = mesh_pb2.RenderResponse(step=request.step)
                    if shared is not None:
                        response.shared_accept.CopyFrom(shared.answer())
                    yield response
                    continue
                try:
                    check_resumed_starts(request, self.engine)
                    check_audio_keys(request)
                except RequestError as e:
                    await abort(context, e)
                    return
                started.update(s.stream_id for s in request.starts)
                started.difference_update(request.ends)
                async with self.lock:
                    response, undelivered = await asyncio.to_thread(self._step, conn, request, shared)
                # As of the steps delivered so far: a report one frame late holds a stream one frame later.
                behind = set(self.audio_out.behind(_key(conn, s) for s in started))
                response.behind_streams.extend(s for s in started if _key(conn, s) in behind)
                yield response
                # The answer goes before the frames' copy to the host: with shared GPU memory the llm queues its
                # next step while the GPU still renders this one. The next request is read after the delivery, so
                # mailboxes get every stream's start, frames and end in render order.
                routed = await asyncio.to_thread(undelivered.to_host)
                undelivered = None
                self.audio_out.deliver(routed)
        finally:
            if undelivered is not None:
                # The llm went away after the answer (a drained llm exits after its last step): that step's frames
                # and ends still reach their mailboxes.
                self.audio_out.deliver(undelivered.to_host())
            # The llm went away: release whatever its streams held, and tell their audio's subscribers.
            lost = unavailable(f"the llm's render stream {conn} closed mid-stream")
            for s in started:
                self.engine.end(_key(conn, s))
                self.audio_out.end(_key(conn, s), lost)
            log.info("render stream %d closed (%d streams released)", conn, len(started))

    async def StreamAudio(self, request, context):  # noqa: N802
        try:
            async with aclosing(self.audio_out.subscribe(request.audio_key)) as frames:
                async for frame in frames:
                    response = mesh_pb2.StreamAudioResponse(index=frame.index, audio=array_proto(frame.audio))
                    if request.frame_states:
                        response.latent.CopyFrom(array_proto(frame.latent))
                        response.semantic.CopyFrom(array_proto(frame.semantic))
                    yield response
        except RequestError as e:
            await abort(context, e)

    async def DescribeModel(self, request, context):  # noqa: N802
        return mesh_pb2.AcousticDescribeModelResponse(info=model_info(self.engine, str(self.engine.ckpt.path)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vvmesh serve acoustic")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50063)
    p.add_argument("--max-streams", type=int, default=256, help="most streams rendered together")
    args = p.parse_args(argv)
    setup_logging("acoustic")
    setup_tracing("acoustic")
    ckpt = resolve_checkpoint(args.model)
    mark_random_weights(ckpt.random_weights)
    torch.set_grad_enabled(False)
    engine = AcousticEngine(
        ckpt, args.device, resolve_dtype(args), args.max_streams, not args.no_cuda_graphs, not args.no_compile
    )
    log.info("acoustic weights loaded: %d parameters on %s", engine.parameter_count(), args.device)

    async def run() -> None:
        service = Service(
            "acoustic", args.host, args.port, [mesh_pb2.DESCRIPTOR.services_by_name["Acoustic"].full_name]
        )
        acoustic = Acoustic(engine)
        mesh_pb2_grpc.add_AcousticServicer_to_server(acoustic, service.server)
        await service.run(grace_s=30, on_drain=acoustic.drain)

    asyncio.run(run())


if __name__ == "__main__":
    main()
