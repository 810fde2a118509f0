"""Decoded voices, kept by the bytes of their files: a voice sent again is not decoded again.

Hosts, narrators and brand voices come back request after request. Decoding a voice file (the container, a
resample) is CPU work in a worker thread of a process whose event loop relays every
playing stream's frames; under the GIL such threads slow that loop, and a burst of arrivals becomes a gap for
everyone (`loop_stalls` names them). A file's bytes decide its samples, so its SHA-256 is the key. A file that
fails to decode is not kept: it fails again, with the same reason, each time it is sent.

Each voice is kept with the digest of its samples, the name the acoustic service knows it by: a voice that comes
back is hashed once, by its file's bytes, not again by its samples for every segment that speaks with it.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.common.audio import voice_digest

# About 24 voices of 28 s (float32 at 24 kHz); a voice alone larger than this is decoded every time.
CACHE_BYTES = 64 << 20


@dataclass(frozen=True, eq=False)
class Voice:
    """A voice as decoded (float32 at 24 kHz, before the acoustic service's normalisation) and its `voice_digest`."""

    samples: np.ndarray
    digest: bytes

    @classmethod
    def of(cls, samples: np.ndarray) -> Voice:
        return cls(samples, voice_digest(samples))

    @property
    def nbytes(self) -> int:
        return self.samples.nbytes


class DecodedVoices:
    """An LRU of decoded voices bounded in bytes, shared by the threads that decode requests' voices. The arrays
    it returns are shared by every request that sent the same file: callers read them and never write."""

    def __init__(self, capacity_bytes: int = CACHE_BYTES) -> None:
        self.capacity_bytes = capacity_bytes
        self.held_bytes = 0
        self._voices: collections.OrderedDict[bytes, Voice] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._voices)

    def get(self, data: bytes, decode: Callable[[bytes], np.ndarray]) -> Voice:
        """The voice of file `data`: kept, or `decode(data)` and its digest (decode's errors pass through, nothing
        kept)."""
        key = hashlib.sha256(data).digest()  # hashlib lets other threads run while it hashes
        with self._lock:
            voice = self._voices.get(key)
            if voice is not None:
                self._voices.move_to_end(key)
                return voice
        voice = Voice.of(decode(data))
        with self._lock:
            if key not in self._voices and voice.nbytes <= self.capacity_bytes:
                self._voices[key] = voice
                self.held_bytes += voice.nbytes
                while self.held_bytes > self.capacity_bytes:
                    _, old = self._voices.popitem(last=False)
                    self.held_bytes -= old.nbytes
        return voice
