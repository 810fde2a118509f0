"""Streamed audio made into files: a stream cannot know its length when it starts, a written file can.

The gateway's WAV says "size unknown" (0xFFFFFFFF) and its FLAC says "total samples unknown" (0), as a
stream must. Readers cope unevenly (Python's `wave` takes 2**31 - 1 frames, soundfile cannot size a read),
so a client that saves the stream to a file patches those fields to the real values. Ogg pages already
carry granule positions and an end-of-stream flag; raw PCM has no header.
"""

from __future__ import annotations

import hashlib
import io
import struct

import numpy as np
import soundfile as sf

_WAV_UNKNOWN = 0xFFFFFFFF
_FLAC_STREAMINFO = 8  # "fLaC" + a 4-byte metadata block header
_FLAC_STREAMINFO_LEN = 34
_BLOCK = 1 << 16  # frames per read when counting or hashing


class ContainerError(ValueError):
    """Bytes that are not the container they claim to be."""


def finalize(data: bytes, fmt: str) -> bytes:
    """The bytes of a complete stream in `fmt` (services.common.audio names), with the file's real sizes."""
    if fmt == "wav":
        return finalize_wav(data)
    if fmt == "flac":
        return finalize_flac(data)
    return data


def finalize_wav(data: bytes) -> bytes:
    """RIFF and data chunk sizes patched to the file's length (the data chunk runs to the end)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ContainerError("not a RIFF/WAVE file")
    out = bytearray(data)
    pos = 12
    while pos + 8 <= len(out):
        chunk, size = struct.unpack_from("<4sI", out, pos)
        if chunk == b"data":
            size = len(out) - (pos + 8)
            if size % 2:
                out.append(0)  # RIFF chunks are padded to an even length
            if len(out) - 8 > _WAV_UNKNOWN:
                raise ContainerError(f"{len(out)} bytes do not fit a RIFF file (4 GiB); write FLAC instead")
            struct.pack_into("<I", out, pos + 4, size)
            struct.pack_into("<I", out, 4, len(out) - 8)
            return bytes(out)
        pos += 8 + size + size % 2
    raise ContainerError("the WAV file has no data chunk")


def _streaminfo(data: bytes) -> tuple[int, int, int]:
    """(total samples, channels, bits per sample) from STREAMINFO, which the format puts first."""
    if data[:4] != b"fLaC" or len(data) < _FLAC_STREAMINFO + _FLAC_STREAMINFO_LEN:
        raise ContainerError("not a FLAC file")
    kind, length = data[4] & 0x7F, int.from_bytes(data[5:8], "big")
    if kind != 0 or length != _FLAC_STREAMINFO_LEN:
        raise ContainerError("the FLAC file does not start with STREAMINFO")
    info = int.from_bytes(data[_FLAC_STREAMINFO + 10 : _FLAC_STREAMINFO + 18], "big")
    # 20 bits sample rate, 3 bits channels - 1, 5 bits bits-per-sample - 1, 36 bits total samples
    return info & (2**36 - 1), ((info >> 41) & 0x7) + 1, ((info >> 36) & 0x1F) + 1


def _count_frames(data: bytes) -> int:
    """Frames in a FLAC whose STREAMINFO does not say, by decoding it."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        block = np.empty((_BLOCK, f.channels), dtype=np.float32)
        total = 0
        while True:
            block.fill(np.nan)
            try:
                n = len(f.read(out=block))
            except sf.SoundFileError:
                # libFLAC cannot seek to the end of a FLAC of unknown length, which soundfile does after
                # the last read; the samples are in `block` by then, and a decoder never produces NaN.
                nan = np.isnan(block[:, 0])
                return total + (int(nan.argmax()) if nan.any() else len(block))
            total += n
            if n < len(block):
                return total


def _md5(data: bytes, frames: int) -> bytes | None:
    """STREAMINFO's MD5 of the samples (little-endian, interleaved); None where it cannot be exact."""
    md5 = hashlib.md5()
    read = 0
    with sf.SoundFile(io.BytesIO(data)) as f:
        for block in f.blocks(blocksize=_BLOCK, dtype="int16", always_2d=True):
            md5.update(block.astype("<i2").tobytes())
            read += len(block)
    return md5.digest() if read == frames else None


def finalize_flac(data: bytes) -> bytes:
    """STREAMINFO's total samples (and the MD5 of 16-bit audio) filled in where the stream left them unknown.

    The minimum and maximum frame sizes stay as the stream wrote them: 0 is the format's "unknown".
    """
    total, _channels, bits = _streaminfo(data)
    if total:
        return data
    try:
        total = _count_frames(data)
    except sf.SoundFileError as e:
        raise ContainerError(f"the FLAC audio cannot be decoded ({e})") from e
    if total >= 2**36:
        raise ContainerError(f"{total} samples do not fit FLAC's STREAMINFO")
    out = bytearray(data)
    at = _FLAC_STREAMINFO + 13  # the byte whose low 4 bits start the 36-bit total
    out[at] = (out[at] & 0xF0) | (total >> 32)
    out[at + 1 : at + 5] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    if bits == 16 and total:
        digest = _md5(bytes(out), total)
        if digest is not None:
            out[_FLAC_STREAMINFO + 18 : _FLAC_STREAMINFO + 34] = digest
    return bytes(out)
