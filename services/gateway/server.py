"""The public TextToSpeech API: checks a request, fans it out to the mesh, and streams encoded audio back."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid

import grpc
import numpy as np
import torch
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import tts_pb2, tts_pb2_grpc

from services.common.audio import MEDIA_TYPES, AudioError, StreamEncoder, decode_voice, normalize_voice
from services.common.errors import RequestError, abort, from_rpc_error, invalid_argument, unavailable
from services.common.frames import FRAMES_PER_SECOND, SAMPLE_RATE, SAMPLES_PER_FRAME
from services.common.grpc_server import Service, insecure_channel
from services.common.logs import escape, mark_random_weights, setup_logging
from services.common.memory import LARGE_REQUEST_BYTES, Trimmer
from services.common.stream_size import expected_branch_positions, expected_frames
from services.common.telemetry import setup_tracing
from services.common.tensors import from_proto, to_proto
from services.gateway.admission import Admission, Room
from services.gateway.options import MAX_REQUEST_ID_CHARS, Options, check_options

log = logging.getLogger(__name__)

PROGRESS_EVERY_FRAMES = 8
VOICE_TIMEOUT_S = 10.0


def _decode_voices(request: tts_pb2.SynthesizeRequest) -> list[np.ndarray]:
    voices = []
    for i, v in enumerate(request.voices):
        try:
            voices.append(normalize_voice(decode_voice(v.audio)))
        except AudioError as e:
            raise invalid_argument(f"voices[{i}].audio", str(e)) from e
    return voices


PROMPT_OVERHEAD_TOKENS = 128  # the system prompt and the speaker and turn markers, about


def _words(request: tts_pb2.SynthesizeRequest) -> int:
    text = " ".join(t.text for t in request.turns.turns) if request.WhichOneof("script") == "turns" else request.text
    return len(text.split())


def estimated_frames(request: tts_pb2.SynthesizeRequest) -> int:
    """A job's audio: fixed frames, or the script's words at the spoken rate (stream_size.expected_frames)."""
    if request.options.HasField("fixed_frames"):
        return request.options.fixed_frames
    return expected_frames(_words(request))


def estimated_positions(request: tts_pb2.SynthesizeRequest) -> int:
    """The KV positions a job is expected to hold, over its three branches, for admission and shortest-job-first:
    a prompt of about two tokens a word, the voices' frames and the system prompt, and the frames it makes."""
    voice_frames = sum(len(v.audio) for v in request.voices) // (2 * SAMPLES_PER_FRAME)  # as 16-bit samples
    prompt = 2 * _words(request) + voice_frames + PROMPT_OVERHEAD_TOKENS
    return sum(expected_branch_positions(prompt, estimated_frames(request)))


def finish_reason(llm_reason: str, options: Options, budget: int) -> str:
    """The llm's reason in the public API's words: its frame budget was the request's max_audio_seconds, or the
    room the context leaves after the prompt."""
    if llm_reason == "max_frames":
        return "max_audio_seconds" if 0 < options.max_frames <= budget else "context"
    return llm_reason


def api_key(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-api-key":
            return value
    return "anonymous"


class Gateway(tts_pb2_grpc.TextToSpeechServicer):
    def __init__(self, text_parser: str, acoustic: str, llm: str, queue_size: int, max_queue_wait: float) -> None:
        self.addresses = {"text_parser": text_parser, "acoustic": acoustic, "llm": llm}
        self.parser = mesh_pb2_grpc.TextParserStub(insecure_channel(text_parser))
        self.acoustic = mesh_pb2_grpc.AcousticStub(insecure_channel(acoustic))
        self.llm = mesh_pb2_grpc.LLMStub(insecure_channel(llm))
        self._model: mesh_pb2.ModelInfo | None = None
        self.admission = Admission(self._llm_room, queue_size, max_queue_wait)
        self.trimmer = Trimmer()

    async def _llm_room(self) -> Room:
        try:
            capacity = await self.llm.Capacity(mesh_pb2.CapacityRequest(), timeout=2.0, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:  # stopping, restarting or gone: no new work can start there
            raise unavailable(f"llm service at {self.addresses['llm']} is not accepting work ({e.code().name})") from e
        if capacity.draining:
            raise unavailable(f"llm service at {self.addresses['llm']} is draining; retry shortly")
        return Room(capacity.slots, capacity.kv_pages * capacity.page_size)

    async def model(self, timeout: float | None) -> mesh_pb2.ModelInfo:
        if self._model is None:
            self._model = (await self.llm.DescribeModel(mesh_pb2.LLMDescribeModelRequest(), timeout=timeout)).info
            mark_random_weights(self._model.random_weights)
        return self._model

    async def _call(self, hop: str, coro):
        try:
            return await coro
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"{hop} service at {self.addresses[hop]}") from e

    async def Synthesize(self, request, context: grpc.aio.ServicerContext):  # noqa: N802
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        key = api_key(context)
        admitted = None
        refused: RequestError | None = None
        try:
            options = check_options(request)
            try:
                cost = estimated_positions(request)
                admitted = await self.admission.acquire(key, cost)
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e, f"llm service at {self.addresses['llm']}") from e
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
        voices = await asyncio.to_thread(_decode_voices, request)
        timeout = context.time_remaining()
        script = (
            mesh_pb2.ParseRequest(
                turns=mesh_pb2.ScriptTurns(
                    turns=[mesh_pb2.ScriptTurn(speaker=t.speaker, text=t.text) for t in request.turns.turns]
                )
            )
            if request.WhichOneof("script") == "turns"
            else mesh_pb2.ParseRequest(text=request.text)
        )
        script.voices.extend(
            mesh_pb2.VoiceSlot(speaker=v.speaker, frames=-(-len(s) // SAMPLES_PER_FRAME))
            for v, s in zip(request.voices, voices, strict=True)
        )
        parsed = await self._call("text_parser", self.parser.Parse(script, timeout=timeout))
        model = await self._call("llm", self.model(timeout))
        max_frames = parsed.max_new_frames
        if options.max_frames:
            max_frames = min(max_frames, options.max_frames)
        if options.fixed_frames > parsed.max_new_frames:
            raise invalid_argument(
                "options.fixed_frames",
                f"{options.fixed_frames} frames do not fit: the prompt leaves room for {parsed.max_new_frames}",
            )

        generate = mesh_pb2.GenerateRequest(
            request_id=request_id,
            prompt_ids=parsed.prompt_ids,
            cfg_scale=options.cfg_scale,
            diffusion_steps=options.diffusion_steps,
            seed=options.seed,
            max_frames=max_frames,
            fixed_frames=options.fixed_frames,
            expected_frames=min(estimated_frames(request), max_frames),
        )
        if voices:
            ordered = [voices[i] for i in parsed.voice_order]
            encoded = await self._call(
                "acoustic",
                self.acoustic.EncodeVoice(
                    mesh_pb2.EncodeVoiceRequest(
                        voices=[to_proto(torch.from_numpy(v)) for v in ordered], seed=options.seed
                    ),
                    # a restarting acoustic service gets a few seconds to come back
                    timeout=min(context.time_remaining() or VOICE_TIMEOUT_S, VOICE_TIMEOUT_S),
                    wait_for_ready=True,
                ),
            )
            generate.voice_embeddings.CopyFrom(encoded.embeddings)
            generate.voice_count = len(ordered)
            generate.voice_max_frames = max(encoded.frames)

        header = tts_pb2.StreamHeader(
            request_id=request_id,
            sample_rate=SAMPLE_RATE,
            format=options.format,
            media_type=MEDIA_TYPES[options.encoder],
            speakers=[
                tts_pb2.Speaker(speaker=s.speaker, model_speaker=s.model_speaker, has_voice=s.has_voice, turns=s.turns)
                for s in parsed.speakers
            ],
            warnings=parsed.warnings,
            model=model.model,
            random_weights=model.random_weights,
            seed=options.seed,
            prompt_tokens=len(parsed.prompt_ids),
            max_frames=options.fixed_frames or max_frames,
        )
        async for response in self._stream(generate, header, options, started, context):
            yield response

    async def _stream(self, generate, header, options: Options, started: float, context):
        encoder = StreamEncoder(options.encoder, SAMPLE_RATE)
        pending = encoder.header()
        first_audio = None
        frames = 0
        header_sent = False
        call = self.llm.Generate(generate, timeout=context.time_remaining())
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    # The llm reports its prompt read once, after admission: errors before it reach the
                    # client as a status with no header.
                    if not header_sent:
                        header_sent = True
                        yield tts_pb2.SynthesizeResponse(header=header)
                    yield tts_pb2.SynthesizeResponse(
                        progress=tts_pb2.Progress(
                            max_frames=header.max_frames,
                            prompt_tokens_done=event.progress.prompt_tokens_done,
                            elapsed_seconds=time.monotonic() - started,
                        )
                    )
                elif kind == "frame":
                    samples = from_proto(event.frame.audio).numpy()
                    data = pending + encoder.encode(samples)
                    pending = b""
                    if first_audio is None:
                        first_audio = time.monotonic() - started
                    frames += 1
                    yield tts_pb2.SynthesizeResponse(
                        audio=tts_pb2.AudioChunk(
                            frame_index=event.frame.index,
                            segment_index=event.frame.segment_index,
                            start_seconds=event.frame.index * SAMPLES_PER_FRAME / SAMPLE_RATE,
                            data=data,
                        )
                    )
                    if frames % PROGRESS_EVERY_FRAMES == 0:
                        yield tts_pb2.SynthesizeResponse(
                            progress=tts_pb2.Progress(
                                frames=frames,
                                audio_seconds=frames / FRAMES_PER_SECOND,
                                elapsed_seconds=time.monotonic() - started,
                                max_frames=header.max_frames,
                                prompt_tokens_done=header.prompt_tokens,
                            )
                        )
                elif kind == "done":
                    tail = pending + encoder.finish()
                    if tail:
                        # The container's trailing bytes (FLAC, Ogg), after the last frame.
                        yield tts_pb2.SynthesizeResponse(
                            audio=tts_pb2.AudioChunk(
                                frame_index=max(frames - 1, 0), start_seconds=frames / FRAMES_PER_SECOND, data=tail
                            )
                        )
                    elapsed = time.monotonic() - started
                    audio_seconds = frames / FRAMES_PER_SECOND
                    yield tts_pb2.SynthesizeResponse(
                        summary=tts_pb2.Summary(
                            frames=frames,
                            audio_seconds=audio_seconds,
                            time_to_first_audio_seconds=first_audio or 0.0,
                            real_time_factor=elapsed / audio_seconds if audio_seconds else 0.0,
                            elapsed_seconds=elapsed,
                            finish_reason=finish_reason(event.done.finish_reason, options, generate.max_frames),
                        )
                    )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"llm service at {self.addresses['llm']}") from e
        finally:
            call.cancel()


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
        service = Service(
            "gateway", args.host, args.port, [tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name]
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
