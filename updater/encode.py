"""The vendor's side of compressed payloads: how ``rpi-updater bundle`` compresses a file.

zstd is written as independent frames, one per ``frame_size`` bytes of input, each with its
content size and a checksum: a device that lost power continues from the last frame whose
output reached its disk (see :mod:`updater.decode`), so a frame is also the most a restart
fetches again. xz and gzip are single streams: a device restarts those files from zero.
"""

from __future__ import annotations

import lzma
import os
import zlib
from dataclasses import dataclass
from typing import Final, Protocol

import zstandard

from updater.manifest import ENCODINGS

DEFAULT_LEVELS: Final = {"zstd": 3, "xz": 6, "gzip": 6}
LEVELS: Final = {"zstd": range(1, 23), "xz": range(0, 10), "gzip": range(1, 10)}
DEFAULT_FRAME_SIZE: Final = 4 << 20
MIN_FRAME_SIZE: Final = 64 << 10
MAX_FRAME_SIZE: Final = 32 << 20  # a device's decoder window stays well inside its memory


class Encoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Compression:
    """How to compress payloads: ``encoding`` None means "store as is"."""

    encoding: str | None = "zstd"
    level: int | None = None  # None: the encoding's default
    frame_size: int = DEFAULT_FRAME_SIZE

    def __post_init__(self) -> None:
        if self.encoding is None:
            return
        if self.encoding not in ENCODINGS:
            raise ValueError(f"compression {self.encoding!r}: expected zstd, xz, gzip or none")
        if self.level is not None and self.level not in LEVELS[self.encoding]:
            levels = LEVELS[self.encoding]
            raise ValueError(
                f"{self.encoding} level {self.level}: expected {levels.start}..{levels.stop - 1}"
            )
        if not MIN_FRAME_SIZE <= self.frame_size <= MAX_FRAME_SIZE:
            raise ValueError(
                f"frame size {self.frame_size}: expected {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE} bytes"
            )

    def encoder(self) -> Encoder:
        assert self.encoding is not None
        level = self.level if self.level is not None else DEFAULT_LEVELS[self.encoding]
        if self.encoding == "zstd":
            return _ZstdFrames(level, self.frame_size)
        if self.encoding == "xz":
            return lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=level)
        return zlib.compressobj(level, wbits=16 + zlib.MAX_WBITS)


class _ZstdFrames:
    """One independent frame (content size, checksum) per ``frame_size`` bytes of input."""

    def __init__(self, level: int, frame_size: int) -> None:
        self._cctx = zstandard.ZstdCompressor(
            level=level,
            write_checksum=True,
            write_content_size=True,
            threads=min(os.cpu_count() or 1, 8),
        )
        self._frame_size = frame_size
        self._pending = bytearray()

    def compress(self, data: bytes) -> bytes:
        self._pending += data
        out = bytearray()
        start = 0
        while len(self._pending) - start >= self._frame_size:
            frame = bytes(self._pending[start : start + self._frame_size])
            out += self._cctx.compress(frame)
            start += self._frame_size
        del self._pending[:start]
        return bytes(out)

    def flush(self) -> bytes:
        if not self._pending:
            return b""
        out = self._cctx.compress(bytes(self._pending))
        self._pending.clear()
        return out
