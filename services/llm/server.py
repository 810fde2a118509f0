"""LLM service: Generate streams one request's audio frames, batched with every other stream by the scheduler."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from collections.abc import Callable

import grpc
import torch
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.common.checkpoint import Checkpoint, resolve_checkpoint
from services.common.errors import RequestError, abort, invalid_argument, unavailable
from services.common.grpc_server import Service
from services.common.limits import (
    DEFAULT_CFG_SCALE,
    DEFAULT_DIFFUSION_STEPS,
    MAX_VOICE_FRAMES,
    MAX_VOICES,
    cfg_scale_problem,
    diffusion_steps_problem,
)
from services.common.logs import mark_random_weights, setup_logging
from services.common.model_args import add_model_args, resolve_dtype
from services.common.model_info import model_info
from services.common.telemetry import mark, setup_tracing
from services.common.tensors import from_proto, to_proto
from services.llm.engine import LMEngine, LMStream
from services.llm.resume import ResumeFrames, ResumeLimits, checked_resume, rebuild_history
from services.llm.scheduler import Failed, Finished, Frame, Job, PromptDone, Scheduler, StillWorking
from services.llm.step_profile import MIN_PLAYING, PROFILED_STEPS, StepProfile
from services.render.audio_out import checked_key
from services.render.link import RenderLink, RenderUnavailable
from services.render.shared_memory import LLMSharedMemory
from services.render.values import StreamSpec
from services.render.wire import WireLink

log = logging.getLogger(__name__)


class LLM(mesh_pb2_grpc.LLMServicer):
    def __init__(self, engine: LMEngine, scheduler: Scheduler, allow_fixed_frames: bool) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.allow_fixed_frames = allow_fixed_frames
        self.draining = False
        self.background: set[Job] = set()  # streams of GenerateRequest.background, while their calls last
        cfg = engine.ckpt.config
        self.between_frames = frozenset({cfg.audio_bos_token_id, cfg.audio_eos_token_id})
        self.feature_sizes = cfg.audio_config.hidden_size, cfg.semantic_model_config.hidden_size

    def _job(self, request: mesh_pb2.GenerateRequest) -> tuple[Job, ResumeFrames | None]:
        """Check an internal request as strictly as the public API checks its own: nothing reaches the step loop
        that could fail a step for every stream."""
        if request.fixed_frames and not self.allow_fixed_frames:
            raise invalid_argument(
                "options.fixed_frames", "this server does not accept fixed_frames (start it with --allow-fixed-frames)"
            )
        prompt = list(request.prompt_ids)
        if not prompt:
            raise invalid_argument("prompt_ids", "empty prompt")
        outside = next((t for t in prompt if not 0 <= t < self.engine.vocab_size), None)
        if outside is not None:
            raise invalid_argument(
                "prompt_ids", f"token id {outside} is outside the vocabulary [0, {self.engine.vocab_size})"
            )
        room = self.engine.max_positions - len(prompt) - 1
        if room < 1:
            raise invalid_argument(
                "prompt_ids",
                f"the prompt takes {len(prompt)} positions; this server's context is "
                f"{self.engine.max_positions} (--max-context)",
            )
        blocks = self.engine.blocks
        if blocks.pages_for(len(prompt) + 1) + 2 > blocks.usable:
            raise invalid_argument(
                "prompt_ids",
                f"the prompt takes {len(prompt)} positions; this server's KV pool holds "
                f"{blocks.usable * blocks.page_size} (--kv-pages)",
            )
        if request.fixed_frames > room:
            raise invalid_argument(
                "options.fixed_frames",
                f"{request.fixed_frames} frames do not fit: the prompt leaves room for {room} in the model's context",
            )
        if request.audio_key:
            checked_key(request.audio_key)  # before it reaches the acoustic side, where it would fail the step
        cfg_scale = request.cfg_scale or DEFAULT_CFG_SCALE
        if problem := cfg_scale_problem(cfg_scale):
            raise invalid_argument("cfg_scale", problem)
        steps = request.diffusion_steps or DEFAULT_DIFFUSION_STEPS
        if problem := diffusion_steps_problem(steps):
            raise invalid_argument("diffusion_steps", problem)
        voices = self._voices(request, sum(1 for t in prompt if t == self.engine.audio_token_id))
        max_frames = min(request.max_frames or room, room)
        resume = None
        if request.HasField("resume"):
            limits = ResumeLimits(
                room,
                max_frames,
                request.fixed_frames,
                self.engine.audio_token_id,
                self.between_frames,
                *self.feature_sizes,
            )
            resume = checked_resume(request.resume, limits)
            taken = len(resume.tokens)
            pages = sum(blocks.pages_for(n) for n in (len(prompt) + taken, taken + 1, resume.latents.shape[0] + 1))
            if pages > blocks.usable:
                raise invalid_argument(
                    "resume.tokens_before",
                    f"rebuilding {taken} steps takes {pages} KV pages; this server's pool holds {blocks.usable}",
                )
        stream = LMStream(
            prompt_ids=prompt,
            voice_embeddings=voices,
            fixed_frames=request.fixed_frames,
            max_frames=max_frames,
            cfg_scale=cfg_scale,
            expected_frames=request.expected_frames,
        )
        spec = StreamSpec(
            stream_id=self.scheduler.new_stream_id(),
            seed=request.seed,
            cfg_scale=cfg_scale,
            diffusion_steps=steps,
            voice_count=request.voice_count,
            voice_max_frames=request.voice_max_frames,
            audio_key=request.audio_key,
        )
        return Job(stream=stream, spec=spec), resume

    async def _resumed(self, job: Job, resume: ResumeFrames) -> None:
        """The stream rebuilds its state from the history instead of making its frames again."""
        history, replay = await rebuild_history(self.scheduler.runner.link, resume, self.engine.hidden)
        job.stream.history = history
        job.spec = dataclasses.replace(job.spec, history=replay)
        log.info(
            "stream %d resumes after %d frames (%d steps): its state rebuilt, %d frames replayed on the acoustic side",
            job.spec.stream_id,
            replay.frames_made,
            len(history.tokens),
            replay.replay_latents.shape[0],
        )

    def _voices(self, request: mesh_pb2.GenerateRequest, placeholders: int) -> torch.Tensor | None:
        """The voice embeddings for the prompt's placeholder positions, checked against the prompt."""
        if not 0 <= request.voice_count <= MAX_VOICES:
            raise invalid_argument("voice_count", f"{request.voice_count} voices; at most {MAX_VOICES}")
        if not 0 <= request.voice_max_frames <= MAX_VOICE_FRAMES:
            raise invalid_argument(
                "voice_max_frames", f"{request.voice_max_frames} frames; a voice has at most {MAX_VOICE_FRAMES}"
            )
        if (request.voice_count == 0) != (request.voice_max_frames == 0):
            raise invalid_argument("voice_max_frames", "voice_count and voice_max_frames are both 0 or both set")
        if request.voice_count * request.voice_max_frames < placeholders:
            raise invalid_argument(
                "voice_count",
                f"{request.voice_count} voices of at most {request.voice_max_frames} frames cannot fill "
                f"{placeholders} placeholder positions",
            )
        if not request.HasField("voice_embeddings"):
            if placeholders:
                raise invalid_argument(
                    "voice_embeddings", f"{placeholders} placeholder positions but no voice embeddings"
                )
            return None
        try:
            voices = from_proto(request.voice_embeddings)
        except (ValueError, RuntimeError) as e:
            raise invalid_argument("voice_embeddings", f"not a tensor: {e}") from e
        if voices.shape != (placeholders, self.engine.hidden):
            raise invalid_argument(
                "voice_embeddings",
                f"shape {tuple(voices.shape)}; the prompt needs ({placeholders}, {self.engine.hidden})",
            )
        if not voices.is_floating_point() or not torch.isfinite(voices).all():
            raise invalid_argument("voice_embeddings", "must be finite floating-point values")
        # Pinned here, its copy to the device at admission neither waits for the device nor pins on the loop.
        return voices.pin_memory() if self.engine.device.type == "cuda" else voices

    async def Generate(self, request, context: grpc.aio.ServicerContext):  # noqa: N802
        try:
            # Checking megabytes of voices and a long prompt is work off the loop that runs every stream's steps.
            job, resume = await asyncio.to_thread(self._job, request)
            mark("request checked")
            if resume is not None:
                await self._resumed(job, resume)
        except RequestError as e:
            await abort(context, e)
            return
        except RenderUnavailable as e:
            await abort(context, unavailable(str(e)))
            return
        if request.background:
            self.background.add(job)
        self.scheduler.submit(job)
        first_frame = True
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Frame):
                    if first_frame:
                        first_frame = False
                        mark("first frame")
                    yield mesh_pb2.GenerateResponse(frame=generated_frame(event, keyed=bool(request.audio_key)))
                elif isinstance(event, PromptDone | StillWorking):
                    if isinstance(event, PromptDone):
                        mark("prompt prefilled")
                    tokens = len(job.stream.prompt_ids)
                    yield mesh_pb2.GenerateResponse(
                        progress=mesh_pb2.GenerateProgress(prompt_tokens_done=tokens, prompt_tokens=tokens)
                    )
                elif isinstance(event, Finished):
                    yield mesh_pb2.GenerateResponse(
                        done=mesh_pb2.GenerateDone(frames=event.frames, finish_reason=event.reason)
                    )
                    return
                elif isinstance(event, Failed):
                    await abort(context, unavailable(event.message))
                    return
        finally:
            # Client gone, deadline passed, or done: its row and pages are released at the next step boundary.
            self.scheduler.cancel(job)
            self.background.discard(job)

    async def Capacity(self, request, context):  # noqa: N802
        blocks = self.engine.blocks
        return mesh_pb2.CapacityResponse(
            slots=self.engine.capacity,
            active=len(self.scheduler.active),
            waiting=len(self.scheduler.waiting),
            waiting_live=sum(1 for j in self.scheduler.waiting if j not in self.background),
            max_positions=self.engine.max_positions,
            step_ms=self.scheduler.step_ms,
            draining=self.draining,
            kv_pages=blocks.usable,
            kv_pages_available=max(0, blocks.available),
            page_size=blocks.page_size,
            expected_positions=sum(self.engine.expected_positions(j.stream) for j in self.scheduler.active),
            preemptions=self.engine.preemptions,
        )

    async def DescribeModel(self, request, context):  # noqa: N802
        return mesh_pb2.LLMDescribeModelResponse(info=model_info(self.engine, str(self.engine.ckpt.path)))


def generated_frame(frame: Frame, keyed: bool) -> mesh_pb2.GeneratedFrame:
    """The llm's part of a frame; a keyed stream's audio, latent and semantic features reach its consumer from the
    acoustic side (Acoustic.StreamAudio), so they never pass through here."""
    out = mesh_pb2.GeneratedFrame(index=frame.index, segment_index=frame.segment, tokens_before=frame.tokens_before)
    if not keyed:
        out.audio.CopyFrom(to_proto(frame.audio))
        out.latent.CopyFrom(to_proto(frame.latent))
        out.semantic.CopyFrom(to_proto(frame.semantic))
    return out


def shared_memory(engine: LMEngine) -> LLMSharedMemory | None:
    """On a GPU, the buffers the llm offers a remote acoustic service on the same GPU."""
    if engine.device.type != "cuda":
        return None
    return LLMSharedMemory(engine.device, engine.capacity, engine.hidden, engine.dtype)


def parser(prog: str = "vvmesh serve llm") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50064)
    p.add_argument(
        "--acoustic",
        default="127.0.0.1:50063",
        help="address of the acoustic service, or 'local' to host the acoustic engine in this process",
    )
    p.add_argument("--max-streams", type=int, default=256, help="most streams decoded together")
    p.add_argument("--max-context", type=int, default=None, help="positions per stream (default: the model's)")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9, help="share of GPU memory this process plans")
    p.add_argument(
        "--kv-pages",
        type=int,
        default=None,
        help="KV pages in the pool (default: as many as the memory fraction leaves room for on a GPU)",
    )
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step")
    p.add_argument(
        "--no-prefill-graphs",
        action="store_true",
        help="on a GPU, launch each prompt chunk's kernels instead of replaying the chunk's CUDA graph",
    )
    p.add_argument(
        "--no-shared-gpu-memory",
        action="store_true",
        help="send a remote acoustic service the step tensors over the wire even when it shares our GPU",
    )
    p.add_argument(
        "--no-pipelined-steps",
        action="store_true",
        help="over the wire, decode and render the whole batch in turn instead of overlapping two halves of it",
    )
    p.add_argument("--drain-grace", type=float, default=120.0, help="seconds running streams get after SIGTERM")
    p.add_argument(
        "--profile-dir",
        default=None,
        help="profile the first steps that carry a prompt chunk while streams play, into this folder",
    )
    p.add_argument(
        "--profile-min-playing",
        type=int,
        default=None,
        help=f"streams playing for a step with a prompt chunk to start the profile (default {MIN_PLAYING})",
    )
    p.add_argument(
        "--profile-min-prompt",
        type=int,
        default=None,
        help="tokens of the longest prompt a step prefills for it to start the profile (default: any)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=None,
        help=f"steps the profile records once it starts (default {PROFILED_STEPS})",
    )
    p.add_argument(
        "--allow-fixed-frames",
        action="store_true",
        help="accept the fixed_frames request option, a test and benchmark option that overrides the model's decisions",
    )
    return p


def load(args: argparse.Namespace, name: str = "llm") -> tuple[Checkpoint, torch.dtype]:
    """Logging, tracing and the checkpoint, as every process that serves the llm starts."""
    setup_logging(name)
    setup_tracing(name)
    ckpt = resolve_checkpoint(args.model)
    mark_random_weights(ckpt.random_weights)
    torch.set_grad_enabled(False)
    return ckpt, resolve_dtype(args)


def build_engine(args: argparse.Namespace, ckpt: Checkpoint, dtype: torch.dtype) -> LMEngine:
    engine = LMEngine(
        ckpt,
        args.device,
        dtype,
        max_streams=args.max_streams,
        max_context=args.max_context,
        kv_pages=args.kv_pages,
        prefill_chunk=args.prefill_chunk,
        memory_fraction=args.gpu_memory_fraction,
        cuda_graphs=not args.no_cuda_graphs,
        torch_compile=not args.no_compile,
        prefill_graphs=not args.no_prefill_graphs,
    )
    log.info("language model loaded: %d parameters on %s", engine.parameter_count(), args.device)
    return engine


async def serve(
    args: argparse.Namespace,
    engine: LMEngine,
    link: RenderLink,
    extra: dict[str, Callable[[grpc.aio.Server], None]] | None = None,
) -> None:
    """Serve LLM until SIGTERM, and the services in `extra` (full name -> what adds its servicer)."""
    # prefills one --prefill-chunk a step (more while nothing plays); pipelines where the link can
    scheduler = Scheduler(
        engine,
        link,
        pipelined=not args.no_pipelined_steps,
        profile=StepProfile(
            args.profile_dir,
            steps=args.profile_steps or PROFILED_STEPS,
            min_playing=MIN_PLAYING if args.profile_min_playing is None else args.profile_min_playing,
            min_prompt=args.profile_min_prompt or 1,
        ),
    )
    names = [mesh_pb2.DESCRIPTOR.services_by_name["LLM"].full_name, *(extra or {})]
    service = Service("llm", args.host, args.port, names)
    for add in (extra or {}).values():
        add(service.server)
    llm = LLM(engine, scheduler, args.allow_fixed_frames)
    mesh_pb2_grpc.add_LLMServicer_to_server(llm, service.server)
    await service.run(grace_s=args.drain_grace, on_drain=lambda: setattr(llm, "draining", True))
    await link.close()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.acoustic == "local":
        raise SystemExit("the llm with the acoustic engine in its process is `vvmesh serve llm --acoustic local`")
    ckpt, dtype = load(args)
    engine = build_engine(args, ckpt, dtype)

    async def run() -> None:
        shared = None if args.no_shared_gpu_memory else shared_memory(engine)
        await serve(args, engine, WireLink(args.acoustic, shared))

    asyncio.run(run())


if __name__ == "__main__":
    main()
