"""Compressed payloads, decompressed on the fly into their target, and resumable.

A file the signed manifest declares compressed (``encoding``: zstd, xz or gzip) travels as the
compressed bytes and lands as the image. Three promises are kept here:

- **Bounded memory, whatever the input.** Output is produced in bounded pieces: zstd is fed one
  block at a time (a block never decompresses to more than 128 KiB), xz and gzip through
  ``max_length``. A stream that would decompress to more than the manifest's size is stopped at
  that size (:class:`DecodeError`, step -3): a decompression bomb never reaches the disk or RAM.
- **Both digests.** The task's digest (MD5 or SHA-256) covers the bytes transferred, the
  manifest's SHA-256 and size the image; both are checked before the file counts as verified.
- **Resume after a restart.** zstd streams are made of independent frames (``rpi-updater
  bundle`` starts one every few MiB of image). The frame walker here knows where each frame ends
  in both streams; once the image up to a frame's end is durable on the target, that point (the
  transferred offset, the image offset, and the saved state of the transfer digest) goes into
  the journal, and a restarted install continues from there: it re-hashes the image prefix from
  the target, restores the transfer digest's state, and asks the server for the bytes after the
  frame. xz and gzip have no such points: a restart starts those files over.
"""

from __future__ import annotations

import abc
import lzma
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

import zstandard

from updater.digest import ResumableHash, available
from updater.errors import VerificationError
from updater.stream import FileStream, new_hasher
from updater.task import DigestMethod

CHUNK: Final = 1 << 20  # xz/gzip: the most output produced per step
MAX_WINDOW: Final = 64 << 20  # zstd: the largest window a frame may ask for (decoder memory)
XZ_MEMLIMIT: Final = 96 << 20  # xz: the decoder's memory limit (preset 9 needs about 65 MiB)
BLOCK_MAX: Final = 128 << 10  # zstd: the largest block, compressed or not (RFC 8878)

_ZSTD_MAGIC: Final = 0xFD2FB528
_SKIPPABLE_MASK: Final = 0xFFFFFFF0
_SKIPPABLE_MAGIC: Final = 0x184D2A50


class DecodeError(VerificationError):
    """The compressed stream is corrupt, truncated, or decompresses to more than declared."""


class Decoder(Protocol):
    """Turns compressed bytes into image bytes, in bounded pieces."""

    encoding: str
    resumable: bool  # whether feed() reports frame ends a restart may continue from

    def feed(self, data: bytes) -> Iterator[bytes | int]:
        """Image bytes (``bytes``) in order and, for each frame that ends in ``data``, the
        position in ``data`` just after it (``int``), in stream order."""
        ...

    def finish(self) -> None:
        """The stream ended: refuse a truncated one."""
        ...

    def reset(self) -> None:
        """Start again at a frame start (byte 0, or a frame end recorded earlier)."""
        ...


def make_decoder(encoding: str, file_name: str) -> Decoder:
    if encoding == "zstd":
        return ZstdDecoder(file_name)
    if encoding == "xz":
        return _XzDecoder(file_name)
    if encoding == "gzip":
        return _GzipDecoder(file_name)
    raise DecodeError(f"unknown encoding {encoding!r}", file_name=file_name)


# --- zstd: a frame and block walker in front of the library's decoder ---------------------------


class ZstdDecoder:
    """Walks the frame format (RFC 8878) to know where blocks and frames end, and feeds the
    library one whole block at a time, so that no call can produce more than a block."""

    encoding = "zstd"
    resumable = True

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name
        self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self.reset()

    def reset(self) -> None:
        self._buf = bytearray()
        self._need = 4  # bytes wanted for the current step
        self._step = "magic"
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self._content_size: int | None = None
        self._frame_out = 0
        self._checksum = False
        self._last_block = False
        self._skip = 0

    def _error(self, message: str) -> DecodeError:
        return DecodeError(f"corrupt zstd stream: {message}", file_name=self.file_name)

    def finish(self) -> None:
        if self._step != "magic" or self._buf:
            raise DecodeError(
                "the zstd stream ends inside a frame (truncated)", file_name=self.file_name
            )

    def feed(self, data: bytes) -> Iterator[bytes | int]:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._step == "skip":
                take = min(self._skip, len(view) - pos)
                self._skip -= take
                pos += take
                if not self._skip:
                    self._step, self._need = "magic", 4
                    yield pos
                continue
            take = min(self._need - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) < self._need:
                continue
            out = self._advance()
            if out:
                yield out
            if self._step == "magic" and not self._buf:
                yield pos  # a frame ended here

    def _advance(self) -> bytes:
        """One step of the walk with ``self._need`` bytes in ``self._buf``."""
        step = self._step
        if step == "magic":
            magic = int.from_bytes(self._buf[:4], "little")
            if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._step, self._need = "skip-size", 8
            elif magic == _ZSTD_MAGIC:
                self._step, self._need = "fhd", 5
            else:
                raise self._error(f"no frame starts here (magic {magic:#010x})")
            return b""
        if step == "skip-size":
            self._skip = int.from_bytes(self._buf[4:8], "little")
            self._buf.clear()
            self._step, self._need = ("skip", 0) if self._skip else ("magic", 4)
            return b""
        if step == "fhd":
            self._need = _header_size(self._buf[4])
            self._step = "header"
            if len(self._buf) < self._need:
                return b""
            step = "header"
        if step == "header":
            self._start_frame(bytes(self._buf))
            self._buf.clear()
            self._step, self._need = "block-header", 3
            return b""
        if step == "block-header":
            header = int.from_bytes(self._buf[:3], "little")
            self._last_block = bool(header & 1)
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise self._error("a block of the reserved type")
            if size > BLOCK_MAX:
                raise self._error(f"a block of {size} bytes (at most {BLOCK_MAX})")
            self._step = "block"
            self._need = 3 + (1 if kind == 1 else size)
            if len(self._buf) < self._need:
                return b""
        if self._step == "block":
            out = self._decode(bytes(self._buf))
            self._buf.clear()
            if self._last_block:
                self._step, self._need = ("checksum", 4) if self._checksum else ("end", 0)
            else:
                self._step, self._need = "block-header", 3
            if self._step == "end":
                self._end_frame()
            return out
        if step == "checksum":
            out = self._decode(bytes(self._buf))
            self._buf.clear()
            self._end_frame()
            return out
        raise AssertionError(f"zstd walker in step {step}")  # pragma: no cover

    def _start_frame(self, header: bytes) -> None:
        fhd = header[4]
        if fhd & 0x08:
            raise self._error("the reserved bit of the frame header is set")
        if fhd & 0x03:
            raise self._error("the frame needs a dictionary (not supported)")
        self._checksum = bool(fhd & 0x04)
        fcs_size = _fcs_size(fhd)
        self._content_size = None
        if fcs_size:
            raw = int.from_bytes(header[len(header) - fcs_size :], "little")
            self._content_size = raw + 256 if fcs_size == 2 else raw
        self._frame_out = 0
        self._obj = self._dctx.decompressobj()
        self._decode(header)

    def _decode(self, data: bytes) -> bytes:
        assert self._obj is not None
        try:
            out = self._obj.decompress(data)
        except zstandard.ZstdError as err:
            raise self._error(str(err)) from err
        self._frame_out += len(out)
        if self._content_size is not None and self._frame_out > self._content_size:
            raise self._error(f"a frame decodes to more than the {self._content_size} it declares")
        return out

    def _end_frame(self) -> None:
        assert self._obj is not None
        if not self._obj.eof:
            raise self._error("a frame's last block did not end the frame")
        if self._content_size is not None and self._frame_out != self._content_size:
            raise self._error(
                f"a frame decodes to {self._frame_out} bytes, it declares {self._content_size}"
            )
        self._obj = None
        self._step, self._need = "magic", 4


def _header_size(fhd: int) -> int:
    """Bytes of a frame header, magic included, from its descriptor byte."""
    single_segment = bool(fhd & 0x20)
    dict_size = (0, 1, 2, 4)[fhd & 0x03]
    return 4 + 1 + (0 if single_segment else 1) + dict_size + _fcs_size(fhd)


def _fcs_size(fhd: int) -> int:
    flag = fhd >> 6
    if flag == 0:
        return 1 if fhd & 0x20 else 0
    return (2, 4, 8)[flag - 1]


# --- xz and gzip: the standard library's decoders, with max_length ---------------------------


class _Decompressor(Protocol):
    """What :mod:`lzma` and :mod:`zlib` decompressor objects have in common."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class _LibDecoder(abc.ABC):
    """A standard-library decoder bounded by ``max_length``; concatenated streams (or gzip
    members), as the command-line tools write them, are accepted."""

    encoding = ""
    resumable = False
    _errors: tuple[type[Exception], ...] = ()

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name
        self.reset()

    def reset(self) -> None:
        self._obj = self._new()
        self._fed = False

    @abc.abstractmethod
    def _new(self) -> _Decompressor:
        """A decompressor for one stream (or member)."""

    @abc.abstractmethod
    def _next(self, out: bytes) -> bytes | None:
        """What to decompress next when the stream has not ended: the rest of the input (or
        b"" for output held back by ``max_length``), or None when more input is needed."""

    def feed(self, data: bytes) -> Iterator[bytes]:
        pending: bytes | None = data
        if data and self._obj.eof:
            self._obj = self._new()  # a concatenated stream starts in this piece
        errors: tuple[type[Exception], ...] = (*self._errors, EOFError)
        while pending is not None:
            self._fed = True
            try:
                out = self._obj.decompress(pending, CHUNK)
            except errors as err:
                raise DecodeError(
                    f"corrupt {self.encoding} stream: {err}", file_name=self.file_name
                ) from err
            if out:
                yield out
            if self._obj.eof:
                if not self._obj.unused_data:
                    return
                pending = self._obj.unused_data
                self._obj = self._new()  # a concatenated stream
                continue
            pending = self._next(out)

    def finish(self) -> None:
        if self._fed and not self._obj.eof:
            raise DecodeError(f"the {self.encoding} stream is truncated", file_name=self.file_name)


class _XzDecoder(_LibDecoder):
    encoding = "xz"
    _errors = (lzma.LZMAError,)

    def _new(self) -> _Decompressor:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

    def _next(self, out: bytes) -> bytes | None:
        obj = self._obj
        assert isinstance(obj, lzma.LZMADecompressor)
        return None if obj.needs_input else b""  # lzma keeps unread input itself


class _GzipDecoder(_LibDecoder):
    encoding = "gzip"
    _errors = (zlib.error,)

    def _new(self) -> _Decompressor:
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    def _next(self, out: bytes) -> bytes | None:
        tail: bytes = getattr(self._obj, "unconsumed_tail", b"")
        if tail:
            return tail
        return b"" if len(out) == CHUNK else None  # output held back, or all done


# --- the receiver: transfer digest, decoder, image stream, resume points ---------------------


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """A frame end whose image bytes are durable: where a restart may continue."""

    offset: int  # bytes of the transfer before it
    image_offset: int  # bytes of the image before it
    transfer_state: str  # the saved state of the transfer digest at ``offset``


NO_RESUME: Final = ResumePoint(0, 0, "")
"""Recorded when a file starts over: nothing of it may be resumed from."""


class DecodedStream:
    """The :class:`~updater.fetch.Receiver` of a compressed file: takes the transferred bytes,
    hashes them (the task's digest), decodes them and writes the image through ``image``.

    ``image`` is a :class:`~updater.stream.FileStream` over the target whose ``on_durable``
    calls :meth:`image_durable`, and whose size is the manifest's image size.
    """

    def __init__(
        self,
        image: FileStream,
        decoder: Decoder,
        *,
        digest_method: DigestMethod,
        file_name: str,
        on_bytes: Callable[[int], None],
        on_resume_point: Callable[[ResumePoint], None],
    ) -> None:
        self.image = image
        self.decoder = decoder
        self.digest_method = digest_method
        self.file_name = file_name
        self.on_bytes = on_bytes
        self.on_resume_point = on_resume_point
        # Resume points need a digest whose state can be saved; without libcrypto a restart
        # starts the file over (a dropped connection still resumes, in this process).
        self.resumable = decoder.resumable and image.sink.resumable and available()
        self._new_hash()
        self.offset = 0
        self._points: deque[ResumePoint] = deque()
        self._lock = threading.Lock()

    def _new_hash(self) -> None:
        self._hash: ResumableHash | None = None
        if self.resumable:
            self._hash = ResumableHash(self.digest_method)
            self._plain = None
        else:
            self._plain = new_hasher(self.digest_method)

    def _update(self, data: bytes | memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
        else:
            assert self._plain is not None
            self._plain.update(data)

    def resume_from(self, point: ResumePoint) -> None:
        """Continue after a restart from a recorded frame end (or, when the point cannot be
        used, from byte 0: ``offset`` says which)."""
        if not self.resumable or point.offset <= 0:
            return
        try:
            restored = ResumableHash.restore(point.transfer_state)
        except (ValueError, RuntimeError):
            return  # a state this machine cannot use: from byte 0
        self.image.resume_from(point.image_offset)
        if self.image.offset != point.image_offset:
            return  # the sink could not keep its prefix: from byte 0
        self._hash = restored
        self.offset = point.offset
        self.decoder.reset()
        self.on_bytes(point.offset)

    def write(self, data: bytes) -> None:
        start = 0
        view = memoryview(data)
        for piece in self.decoder.feed(data):
            if isinstance(piece, int):  # a frame ends here: a possible resume point
                self._update(view[start:piece])
                start = piece
                if self._hash is not None:
                    point = ResumePoint(self.offset + piece, self.image.offset, self._hash.state())
                    with self._lock:
                        self._points.append(point)
                continue
            if self.image.offset + len(piece) > self.image.size:
                raise DecodeError(
                    f"the {self.decoder.encoding} stream decompresses to more than the "
                    f"{self.image.size} bytes the manifest declares",
                    file_name=self.file_name,
                )
            self.image.write(piece)
        self._update(view[start:])
        self.offset += len(data)
        self.on_bytes(len(data))

    def image_durable(self, image_offset: int) -> None:
        """Called when the image is durable up to ``image_offset`` (from the writer thread or
        a checkpoint): the last frame end at or before it becomes the resume point."""
        latest = None
        with self._lock:
            while self._points and self._points[0].image_offset <= image_offset:
                latest = self._points.popleft()
        if latest is not None:
            self.on_resume_point(latest)

    def checkpoint(self) -> int:
        self.image.checkpoint()
        return self.offset

    def restart(self) -> None:
        """The file changed on the server: from byte 0, and the journal says so first."""
        with self._lock:
            self._points.clear()
        self.on_resume_point(NO_RESUME)
        self.decoder.reset()
        self._new_hash()
        undone, self.offset = self.offset, 0
        self.image.restart()
        self.on_bytes(-undone)

    def finish(self) -> tuple[str, str]:
        """(transfer digest, image SHA-256) once every byte arrived; a short or overlong
        image, or a stream that ends inside a frame, is refused."""
        self.decoder.finish()
        image_digest = self.image.finish()
        if self.image.offset != self.image.size:
            raise DecodeError(
                f"the {self.decoder.encoding} stream decompresses to {self.image.offset} bytes, "
                f"the manifest declares {self.image.size}",
                file_name=self.file_name,
            )
        if self._hash is not None:
            return self._hash.hexdigest(), image_digest
        assert self._plain is not None
        return self._plain.hexdigest(), image_digest
