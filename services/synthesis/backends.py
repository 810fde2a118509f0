"""The mesh a synthesis runs on: text_parser's Parse, acoustic's EncodeVoice and llm's Generate, with errors
carried back in the caller's terms (the failing hop named, its status kept)."""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from vibevoice.tts.v1 import tts_pb2

from services.common.audio import MEDIA_TYPES, AudioError, decode_voice
from services.common.errors import from_rpc_error, invalid_argument, unavailable
from services.common.frames import SAMPLE_RATE, SAMPLES_PER_FRAME
from services.common.grpc_server import insecure_channel
from services.common.logs import mark_random_weights
from services.common.wire_arrays import array_proto
from services.synthesis.options import Options
from services.synthesis.voice_cache import DecodedVoices, Voice

VOICE_READY_S = 10.0  # how long a restarting acoustic service gets to come back
VOICE_ENCODE_S = 600.0  # an encoding's bound without a caller's deadline: four 60 s voices on a slow CPU fit
VOICES_SENT_KEPT = 4096  # digests (32 bytes each) of voices the acoustic service has taken
CAPACITY_TIMEOUT_S = 2.0


def api_key(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: the x-api-key metadata ("anonymous" without one). Not authenticated yet."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-api-key":
            return value
    return "anonymous"


def method_path(service: str, method: str) -> str:
    """The path of a mesh service's method, for a call made with `channel.unary_unary` and the like."""
    return f"/{mesh_pb2.DESCRIPTOR.services_by_name[service].full_name}/{method}"


DECODED_VOICES = DecodedVoices()


def decode_voices(request: tts_pb2.SynthesizeRequest) -> list[Voice]:
    """The request's voices decoded (float32 at 24 kHz; the acoustic service normalises them) with their digests;
    files seen before come from `DECODED_VOICES`. The arrays may be shared with other requests: read them, never
    write them."""
    voices = []
    for i, v in enumerate(request.voices):
        try:
            voices.append(DECODED_VOICES.get(v.audio, decode_voice))
        except AudioError as e:
            raise invalid_argument(f"voices[{i}].audio", str(e)) from e
    return voices


def finish_reason(llm_reason: str, budget_left: int, room: int) -> str:
    """The llm's reason for one segment in the public API's words: its frame budget was what was left of the
    request's max_audio_seconds (`budget_left`, 0 without one), or the room the context leaves after the prompt."""
    if llm_reason == "max_frames":
        return "max_audio_seconds" if 0 < budget_left <= room else "context"
    return llm_reason


@dataclass
class Prepared:
    """A request made ready for the llm: its segments' prompts, the Generate fields they share, and the header its
    stream starts with."""

    generate: mesh_pb2.GenerateRequest  # the fields every segment's Generate has (no prompt, no voices)
    segments: list[mesh_pb2.ScriptSegment]
    header: tts_pb2.StreamHeader

    @property
    def max_frames(self) -> int:
        """The frames the whole script may make (the header's max_frames)."""
        return self.header.max_frames


class Backends:
    def __init__(self, text_parser: str, acoustic: str, llm: str, frame_states: bool = False) -> None:
        # frame_states: each frame also carries its latent and semantic features (the jobs service keeps them
        # to rebuild a stream on resume; live calls need only the audio).
        self.frame_states = frame_states
        self.addresses = {"text_parser": text_parser, "acoustic": acoustic, "llm": llm}
        self.parser = mesh_pb2_grpc.TextParserStub(insecure_channel(text_parser))
        acoustic_channel, llm_channel = insecure_channel(acoustic), insecure_channel(llm)
        self._acoustic_channel = acoustic_channel
        self.acoustic = mesh_pb2_grpc.AcousticStub(acoustic_channel)
        self.llm = mesh_pb2_grpc.LLMStub(llm_channel)
        # The two calls that carry megabytes (a request's voice samples; their embeddings with the prompt) take
        # requests serialized beforehand, off the event loop that relays every stream's audio.
        self._encode_voice = acoustic_channel.unary_unary(
            method_path("Acoustic", "EncodeVoice"), response_deserializer=mesh_pb2.EncodeVoiceResponse.FromString
        )
        self._generate = llm_channel.unary_stream(
            method_path("LLM", "Generate"), response_deserializer=mesh_pb2.GenerateResponse.FromString
        )
        self._model: mesh_pb2.ModelInfo | None = None
        # Digests of voices whose samples the acoustic service took, least recently used first: those go by digest
        # next time.
        self._voices_sent: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    async def call(self, hop: str, coro):
        try:
            return await coro
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"{hop} service at {self.addresses[hop]}") from e

    async def capacity(self) -> mesh_pb2.CapacityResponse:
        """The llm's room now; UNAVAILABLE while it cannot take new work (stopping, restarting, draining)."""
        try:
            capacity = await self.llm.Capacity(
                mesh_pb2.CapacityRequest(), timeout=CAPACITY_TIMEOUT_S, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as e:
            raise unavailable(f"llm service at {self.addresses['llm']} is not accepting work ({e.code().name})") from e
        if capacity.draining:
            raise unavailable(f"llm service at {self.addresses['llm']} is draining; retry shortly")
        return capacity

    async def model(self, timeout: float | None) -> mesh_pb2.ModelInfo:
        if self._model is None:
            self._model = (await self.llm.DescribeModel(mesh_pb2.LLMDescribeModelRequest(), timeout=timeout)).info
            mark_random_weights(self._model.random_weights)
        return self._model

    async def max_positions(self) -> int:
        """The llm's positions per stream (its --max-context), which every segment must fit. Asked each time: a
        restarted llm may have another context. An llm that is stopping or draining answers UNAVAILABLE here, as
        admission does, not the deadline of a call its closed port never answers."""
        return (await self.capacity()).max_positions

    async def prepare(
        self,
        request: tts_pb2.SynthesizeRequest,
        options: Options,
        request_id: str,
        voices: list[Voice],
        timeout: float | None,
    ) -> Prepared:
        """The segments' prompts (text_parser's Plan) and the header; the voices' embeddings are encoded per
        segment as it starts (`encode_voices`)."""
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
            mesh_pb2.VoiceSlot(speaker=v.speaker, frames=-(-len(s.samples) // SAMPLES_PER_FRAME))
            for v, s in zip(request.voices, voices, strict=True)
        )
        model = await self.call("llm", self.model(timeout))
        plan = mesh_pb2.PlanRequest(
            script=script, max_positions=await self.max_positions(), fixed_frames=options.fixed_frames
        )
        planned = await self.call("text_parser", self.parser.Plan(plan, timeout=timeout))
        segments = list(planned.segments)
        max_frames = sum(s.max_new_frames for s in segments)
        if options.max_frames:
            max_frames = min(max_frames, options.max_frames)
        generate = mesh_pb2.GenerateRequest(
            request_id=request_id,
            cfg_scale=options.cfg_scale,
            diffusion_steps=options.diffusion_steps,
            seed=options.seed,
        )
        header = tts_pb2.StreamHeader(
            request_id=request_id,
            sample_rate=SAMPLE_RATE,
            format=options.format,
            media_type=MEDIA_TYPES[options.encoder],
            speakers=[
                tts_pb2.Speaker(speaker=s.speaker, model_speaker=s.model_speaker, has_voice=s.has_voice, turns=s.turns)
                for s in planned.speakers
            ],
            warnings=planned.warnings,
            model=model.model,
            random_weights=model.random_weights,
            seed=options.seed,
            prompt_tokens=sum(len(s.prompt_ids) for s in segments),
            max_frames=options.fixed_frames or max_frames,
        )
        return Prepared(generate, segments, header)

    async def encode_voices(
        self,
        generate: mesh_pb2.GenerateRequest,
        voice_order: list[int],
        voices: list[Voice],
        time_remaining: float | None,
    ) -> None:
        """The prompt embeddings of the voices in `voice_order` (indices into `voices`), sampled by the acoustic
        service with `generate.seed`, into `generate`."""
        if not voice_order:
            return
        ordered = [voices[i] for i in voice_order]
        # A restarting acoustic service gets a few seconds to come back; the encoding itself has the caller's
        # deadline, since long voices on a CPU take longer than those seconds.
        timeout = VOICE_ENCODE_S if time_remaining is None else time_remaining
        await self._acoustic_ready(min(timeout, VOICE_READY_S))
        digests = [v.digest for v in ordered]
        encoded = None
        if all(d in self._voices_sent for d in digests):
            for d in digests:
                self._voices_sent.move_to_end(d)
            # Voices the acoustic service has encoded go by their digests: no megabytes built or sent.
            by_digest = mesh_pb2.EncodeVoiceRequest(voice_digests=digests, seed=generate.seed)
            try:
                encoded = await self.acoustic.EncodeVoice(by_digest, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: evicted or restarted, so the samples go
                    raise from_rpc_error(e, f"acoustic service at {self.addresses['acoustic']}") from e
        if encoded is None:

            def request() -> bytes:
                voice_protos = [array_proto(v.samples) for v in ordered]
                return mesh_pb2.EncodeVoiceRequest(voices=voice_protos, seed=generate.seed).SerializeToString()

            encoded = await self.call("acoustic", self._encode_voice(await asyncio.to_thread(request), timeout=timeout))
            for d in digests:
                self._voices_sent[d] = None
                self._voices_sent.move_to_end(d)
            while len(self._voices_sent) > VOICES_SENT_KEPT:
                self._voices_sent.popitem(last=False)
        generate.voice_embeddings.CopyFrom(encoded.embeddings)
        generate.voice_count = len(ordered)
        generate.voice_max_frames = max(encoded.frames)

    async def _acoustic_ready(self, timeout: float) -> None:
        """Waits up to `timeout` for the acoustic service to be reachable; UNAVAILABLE naming it when it is not."""
        try:
            await asyncio.wait_for(self._acoustic_channel.channel_ready(), timeout)
        except TimeoutError as e:
            where = f"acoustic service at {self.addresses['acoustic']}"
            raise unavailable(f"{where} did not become reachable in {timeout:.0f} s; retry shortly") from e

    async def generate(
        self, generate: mesh_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[mesh_pb2.GenerateResponse]:
        """The llm's events for one stream, each frame with its audio (and, with `frame_states`, its latent and
        semantic features), which come straight from the acoustic service (StreamAudio, by a fresh key) and are
        paired with the llm's frames by order. Leaving the loop early ends the stream there (its row is freed, both
        calls cancelled)."""
        generate.audio_key = secrets.token_hex(16)
        request = await asyncio.to_thread(generate.SerializeToString)  # before the calls open: nothing to close
        audio = self.acoustic.StreamAudio(
            mesh_pb2.StreamAudioRequest(audio_key=generate.audio_key, frame_states=self.frame_states), timeout=timeout
        )
        call = self._generate(request, timeout=timeout)
        try:
            async for event in call:
                if event.WhichOneof("event") == "frame":
                    await self._with_audio(event.frame, audio)
                yield event
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"llm service at {self.addresses['llm']}") from e
        finally:
            call.cancel()
            audio.cancel()

    async def _with_audio(self, frame: mesh_pb2.GeneratedFrame, audio: grpc.aio.UnaryStreamCall) -> None:
        """Fills the llm's frame from the next frame of the audio stream; UNAVAILABLE naming the acoustic service
        when that stream fails or ends first."""
        where = f"acoustic service at {self.addresses['acoustic']}"
        try:
            part = await audio.read()
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise from_rpc_error(e, where) from e
            raise unavailable(f"{where}: audio stream failed: {e.code().name}: {e.details()}") from e
        if part is grpc.aio.EOF:
            raise unavailable(f"{where}: audio stream ended before frame {frame.index}")
        if part.index != frame.index:  # the two streams fell out of step: never pair a frame with another's audio
            raise unavailable(f"{where}: audio of frame {part.index} came for frame {frame.index}")
        frame.audio.CopyFrom(part.audio)
        if part.HasField("latent"):  # asked for (frame_states)
            frame.latent.CopyFrom(part.latent)
            frame.semantic.CopyFrom(part.semantic)
