"""A stored job's audio as one complete file in any of the API's formats, written to a file object.

Raw PCM and WAV are the stream's own bytes (services/common/audio.py's encoder, so the samples are quantized
as Synthesize quantizes them), with the WAV's sizes filled in. FLAC and Ogg Opus are written by libsndfile
into the (seekable) file, which lets it go back and fill in STREAMINFO's length and MD5, or close the Ogg
stream properly: every reader sees the file's real length.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import soundfile as sf

from services.common.audio import StreamEncoder
from services.common.frames import SAMPLE_RATE
from services.jobs.frame_log import read_samples

_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "ogg_opus": ("OGG", "OPUS")}
_WAV_HEADER_BYTES = 44  # RIFF, fmt and data chunk headers, as StreamEncoder writes them


def export(frames_path: Path, frames: int, fmt: str, out: BinaryIO) -> None:
    """Frames [0, frames) of a frames file, as a `fmt` file (services.common.audio names) written to `out`."""
    if fmt in _SOUNDFILE:
        container, subtype = _SOUNDFILE[fmt]
        with sf.SoundFile(out, "w", samplerate=SAMPLE_RATE, channels=1, format=container, subtype=subtype) as f:
            for samples in read_samples(frames_path, frames):
                f.write(samples)
        return
    encoder = StreamEncoder(fmt)
    out.write(encoder.header())
    for samples in read_samples(frames_path, frames):
        out.write(encoder.encode(samples))
    out.write(encoder.finish())
    if fmt == "wav":
        size = out.tell()
        if size - 8 > 0xFFFFFFFF:
            raise ValueError(f"{size} bytes do not fit a RIFF file (4 GiB); use FLAC")
        out.seek(4)
        out.write(struct.pack("<I", size - 8))
        out.seek(_WAV_HEADER_BYTES - 4)
        out.write(struct.pack("<I", size - _WAV_HEADER_BYTES))
        out.seek(size)
