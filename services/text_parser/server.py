"""TextParser.Parse: script -> validated turns and the prompt in the reference layout (CPU, tokenizer only)."""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.common.checkpoint import Checkpoint, resolve_checkpoint
from services.common.errors import RequestError, abort, invalid_argument
from services.common.grpc_server import Service
from services.common.limits import MAX_VOICE_FRAMES
from services.common.logs import mark_random_weights, setup_logging
from services.common.memory import LARGE_REQUEST_BYTES, Trimmer
from services.common.telemetry import setup_tracing
from services.text_parser.prompt import PromptBuilder
from services.text_parser.script import ParsedScript, ScriptError, check_turn_count, parse_text, parse_turns
from services.text_parser.segments import TurnTooLong, plan_segments

log = logging.getLogger(__name__)


class TextParser(mesh_pb2_grpc.TextParserServicer):
    def __init__(self, ckpt: Checkpoint) -> None:
        self.builder = PromptBuilder.from_pretrained(ckpt.path, ckpt.config)
        self.context = ckpt.config.text_config.max_position_embeddings
        # A segment's frames are bounded by its context and by the tokens generate() makes at most.
        self.max_new_tokens = ckpt.max_new_tokens
        self.trimmer = Trimmer()

    def _max_new_frames(self, room: int) -> int:
        """The most frames a prompt may make with `room` positions of context after it."""
        return room if self.max_new_tokens is None else min(room, self.max_new_tokens)

    @staticmethod
    def _script(request: mesh_pb2.ParseRequest) -> ParsedScript:
        try:
            if request.WhichOneof("script") == "turns":
                check_turn_count(len(request.turns.turns))
                return parse_turns([(t.speaker, t.text) for t in request.turns.turns])
            return parse_text(request.text)
        except ScriptError as e:
            raise invalid_argument(e.field, e.reason) from e

    @staticmethod
    def _speakers(script: ParsedScript, voice_frames: dict[int, int]) -> list[mesh_pb2.SpeakerMapping]:
        counts: dict[int, int] = {}
        for t in script.turns:
            counts[t.speaker] = counts.get(t.speaker, 0) + 1
        return [
            mesh_pb2.SpeakerMapping(
                speaker=s,
                model_speaker=script.model_speaker(s),
                turns=counts[s],
                has_voice=script.model_speaker(s) in voice_frames,
            )
            for s in script.speakers
        ]

    def parse(self, request: mesh_pb2.ParseRequest) -> mesh_pb2.ParseResponse:
        script = self._script(request)
        voice_frames = self._voice_frames(script, request.voices)
        ids, order = self.builder.build(script, voice_frames, limit=self.context - 1)
        # One position for the first generated token at least; every speech frame takes one more.
        room = self.context - len(ids)
        if room < 1:
            field = "turns" if request.WhichOneof("script") == "turns" else "text"
            raise invalid_argument(
                field,
                f"the script and voice prompts take {len(ids)} tokens; the model's context is {self.context}",
            )
        by_model_speaker = {script.model_speaker(v.speaker): i for i, v in enumerate(request.voices)}
        return mesh_pb2.ParseResponse(
            prompt_ids=ids,
            turns=[mesh_pb2.ScriptTurn(speaker=script.model_speaker(t.speaker), text=t.text) for t in script.turns],
            speakers=self._speakers(script, voice_frames),
            warnings=script.warnings,
            voice_order=[by_model_speaker[k] for k in order],
            max_new_frames=self._max_new_frames(room - 1),
        )

    def plan(self, request: mesh_pb2.PlanRequest) -> mesh_pb2.PlanResponse:
        script = self._script(request.script)
        voices = request.script.voices
        voice_frames = self._voice_frames(script, voices)
        # The llm's context: its positions and the first generated token's (as in `parse`), within the model's.
        context = min(request.max_positions + 1 if request.max_positions else self.context, self.context)
        fixed = request.fixed_frames or None
        field = "turns" if request.script.WhichOneof("script") == "turns" else "text"
        try:
            segments = plan_segments(script, self.builder, voice_frames, context, fixed_frames=fixed, field_name=field)
        except TurnTooLong as e:
            if fixed and e.frame_room > 0:  # its words fit: the frames it was given do not
                raise invalid_argument(
                    "options.fixed_frames",
                    f"{fixed} frames do not fit: shared out by words, one turn gets {e.frames} and its segment "
                    f"leaves room for {e.frame_room}",
                ) from e
            raise invalid_argument(e.field, e.reason) from e
        except ScriptError as e:
            raise invalid_argument(e.field, e.reason) from e
        by_model_speaker = {script.model_speaker(v.speaker): i for i, v in enumerate(voices)}
        out = mesh_pb2.PlanResponse(speakers=self._speakers(script, voice_frames), warnings=script.warnings)
        for segment in segments:
            # Only the voices of its own speakers, as a request of its turns alone would have them.
            speaking = {script.model_speaker(s) for s in segment.script.speakers}
            frames = {k: n for k, n in voice_frames.items() if k in speaking}
            ids, order = self.builder.build(segment.script, frames, limit=context - 1)
            out.segments.append(
                mesh_pb2.ScriptSegment(
                    first_turn=segment.first_turn,
                    turns=len(segment.turns),
                    prompt_ids=ids,
                    voice_order=[by_model_speaker[k] for k in order],
                    max_new_frames=self._max_new_frames(context - len(ids) - 1),
                    fixed_frames=segment.frames if fixed else 0,
                    expected_frames=segment.frames,
                )
            )
        return out

    @staticmethod
    def _voice_frames(script: ParsedScript, voices) -> dict[int, int]:
        speaking = set(script.speakers)
        frames: dict[int, int] = {}
        for i, v in enumerate(voices):
            if v.speaker not in speaking:
                raise invalid_argument(
                    f"voices[{i}].speaker",
                    f"speaker {v.speaker} has a voice but does not speak in the script "
                    f"(speakers: {', '.join(map(str, sorted(speaking)))})",
                )
            k = script.model_speaker(v.speaker)
            if k in frames:
                raise invalid_argument(f"voices[{i}].speaker", f"speaker {v.speaker} has more than one voice")
            if not 1 <= v.frames <= MAX_VOICE_FRAMES:
                raise invalid_argument(
                    f"voices[{i}].frames",
                    f"{v.frames} frames; a voice prompt has at least 1 and at most {MAX_VOICE_FRAMES} (60 s)",
                )
            frames[k] = v.frames
        return frames

    async def Parse(self, request, context: grpc.aio.ServicerContext):  # noqa: N802 (gRPC method name)
        return await self._answer(self.parse, request, context)

    async def Plan(self, request, context: grpc.aio.ServicerContext):  # noqa: N802 (gRPC method name)
        return await self._answer(self.plan, request, context)

    async def _answer(self, handler, request, context: grpc.aio.ServicerContext):
        if request.ByteSize() >= LARGE_REQUEST_BYTES // 4:  # scripts of a few hundred KB tokenize into megabytes
            self.trimmer.due = True
        try:
            return await asyncio.to_thread(handler, request)
        except RequestError as e:
            # A fresh error, aborted outside the except block: the caught one's traceback holds the frames with
            # the script and its token ids, and the abort would keep them in a reference cycle (megabytes per
            # refused script) until the next full garbage collection.
            error = RequestError(e.status)
        await abort(context, error)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vvmesh serve text_parser")
    p.add_argument("--model", default="tiny")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50062)
    args = p.parse_args(argv)
    setup_logging("text_parser")
    setup_tracing("text_parser")
    ckpt = resolve_checkpoint(args.model)
    mark_random_weights(ckpt.random_weights)

    async def run() -> None:
        service = Service(
            "text_parser", args.host, args.port, [mesh_pb2.DESCRIPTOR.services_by_name["TextParser"].full_name]
        )
        parser = TextParser(ckpt)
        mesh_pb2_grpc.add_TextParserServicer_to_server(parser, service.server)
        trimming = asyncio.create_task(parser.trimmer.loop())
        await service.run(grace_s=5)
        trimming.cancel()

    asyncio.run(run())


if __name__ == "__main__":
    main()
