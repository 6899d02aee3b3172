"""A hash whose running state can be saved and restored: SHA-256 and MD5 that survive a restart.

Why: an image travels compressed (zstd) and is decompressed straight into its partition, so the
compressed bytes are never stored anywhere. After a power cut the download resumes from the last
zstd frame boundary whose output is durably on disk, yet the IoT Platform's digest (MD5 or
SHA-256) covers *all* the transferred (compressed) bytes. The hash therefore has to continue from
the state it had at that boundary, saved in the journal, in a new process. :mod:`hashlib` cannot
export its state, so this module drives OpenSSL's libcrypto directly through :mod:`ctypes`, at C
speed: ``SHA256_Init/Update/Final`` and ``MD5_Init/Update/Final`` (deprecated in OpenSSL 3 but
still exported) on a context buffer this module owns, whose bytes are the state.

Layout assumption: the contexts are plain C structs of 32-bit words, ``SHA256_CTX`` 112 bytes
(``h[8], Nl, Nh, data[16], num, md_len``) and ``MD5_CTX`` 92 bytes (``A, B, C, D, Nl, Nh,
data[16], num``), in the machine's byte order. This is not taken on trust: before first use the
library is probed once (:func:`available`) with guard bytes after the context, checking that
``*_Init`` writes exactly the expected initial struct and nothing past it, that the counters sit
where expected after an update, and that results equal :mod:`hashlib`'s. A library that fails the
probe is not used: :func:`available` is false, :class:`ResumableHash` raises
:class:`RuntimeError`, and callers fall back to not resuming (a fresh download).

Why restoring raw C state is safe here: a state is only ever restored on the machine (and the
library) that saved it, from the journal, which is root-only and written atomically, so it is not
attacker-controlled input. It is still validated strictly before it reaches C
(:meth:`ResumableHash.restore`): known method, exact length, lowercase hex, and internally
consistent counters (the buffered byte count ``num`` below the block size and equal to the bit
counter's remainder, ``md_len`` 32 for SHA-256), so a corrupted state cannot make ``*_Update``
write outside the context; it is refused with :class:`ValueError` instead.

The GIL: calls through a :class:`ctypes.CDLL` release it, so hashing runs in parallel with other
Python threads (a writer thread). One :class:`ResumableHash` may be shared between threads: its
operations are serialised by a lock, so :meth:`~ResumableHash.state` never sees a half-done update.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Self

from updater.task import DigestMethod

__all__ = ["ResumableHash", "available"]

_LIBRARY_FALLBACKS: Final = ("libcrypto.so.3", "libcrypto.so.1.1")
_BLOCK: Final = 64  # both SHA-256 and MD5 work on 64-byte blocks
_GUARD: Final = 64  # bytes after the context that the probe checks stay untouched
_GUARD_BYTE: Final = 0xA5
_COPY_CHUNK: Final = 1 << 20  # a read-only buffer is copied at most this much at a time

_SHA256_IV: Final = (
    0x6A09E667,
    0xBB67AE85,
    0x3C6EF372,
    0xA54FF53A,
    0x510E527F,
    0x9B05688C,
    0x1F83D9AB,
    0x5BE0CD19,
)
_MD5_IV: Final = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


@dataclass(frozen=True)
class _Layout:
    """Where the fields of one context struct sit (all 32-bit words, native byte order)."""

    method: DigestMethod
    prefix: str  # of the OpenSSL function names: SHA256_Init, ...
    ctx_size: int
    digest_size: int
    fmt: str  # struct format of the whole context
    state_words: int  # h[8] or A, B, C, D
    has_md_len: bool

    def unpack(self, raw: bytes) -> tuple[int, ...]:
        return struct.unpack(self.fmt, raw)

    def counters(self, raw: bytes) -> tuple[int, int, int]:
        """``(Nl, Nh, num)`` of a context."""
        words = self.unpack(raw)
        nl, nh = words[self.state_words], words[self.state_words + 1]
        num = words[self.state_words + 2 + 16]
        return nl, nh, num

    def initial(self) -> bytes:
        """The context exactly as ``*_Init`` leaves it."""
        if self.method == "sha256":
            return struct.pack(self.fmt, *_SHA256_IV, 0, 0, *([0] * 16), 0, self.digest_size)
        return struct.pack(self.fmt, *_MD5_IV, 0, 0, *([0] * 16), 0)

    def check(self, raw: bytes) -> str | None:
        """Why a context is not one ``*_Update``/``*_Final`` can safely take, or ``None``."""
        nl, _, num = self.counters(raw)
        if num >= _BLOCK:
            return f"buffered byte count {num} is not below the block size {_BLOCK}"
        if nl % 8 != 0 or (nl // 8) % _BLOCK != num:
            return f"buffered byte count {num} does not match the bit counter {nl}"
        if self.has_md_len and self.unpack(raw)[-1] != self.digest_size:
            return f"digest length {self.unpack(raw)[-1]} is not {self.digest_size}"
        return None


_LAYOUTS: Final[dict[DigestMethod, _Layout]] = {
    "sha256": _Layout("sha256", "SHA256", 112, 32, "=8I2I16I2I", 8, True),
    "md5": _Layout("md5", "MD5", 92, 16, "=4I2I16I1I", 4, False),
}
_STATE_RE: Final = re.compile(r"([a-z0-9]+):([0-9a-f]*)")


@dataclass(frozen=True)
class _Functions:
    init: Callable[..., int]
    update: Callable[..., int]
    final: Callable[..., int]


def _load_library() -> ctypes.CDLL:
    names: list[str] = []
    found = ctypes.util.find_library("crypto")
    if found:
        names.append(found)
    names.extend(n for n in _LIBRARY_FALLBACKS if n not in names)
    errors: list[str] = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as err:
            errors.append(f"{name}: {err}")
    raise RuntimeError("cannot load OpenSSL libcrypto (" + "; ".join(errors or ["not found"]) + ")")


def _bind(lib: ctypes.CDLL, layout: _Layout) -> _Functions:
    try:
        init = getattr(lib, f"{layout.prefix}_Init")
        update = getattr(lib, f"{layout.prefix}_Update")
        final = getattr(lib, f"{layout.prefix}_Final")
    except AttributeError as err:
        raise RuntimeError(f"libcrypto lacks the low-level {layout.prefix} API: {err}") from err
    init.argtypes = [ctypes.c_void_p]
    init.restype = ctypes.c_int
    update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    update.restype = ctypes.c_int
    final.argtypes = [ctypes.c_char_p, ctypes.c_void_p]  # (unsigned char *md, CTX *c)
    final.restype = ctypes.c_int
    return _Functions(init, update, final)


def _probe(layout: _Layout, fns: _Functions) -> None:
    """Check the layout assumption and the results against hashlib; raise RuntimeError if off."""

    def fail(why: str) -> RuntimeError:
        return RuntimeError(f"libcrypto {layout.prefix} does not behave as expected: {why}")

    size = layout.ctx_size
    buf = (ctypes.c_char * (size + _GUARD)).from_buffer_copy(bytes([_GUARD_BYTE]) * (size + _GUARD))
    guard = bytes([_GUARD_BYTE]) * _GUARD

    def guarded() -> bytes:
        raw = bytes(buf)
        if raw[size:] != guard:
            raise fail(f"it writes past the {size}-byte context")
        return raw[:size]

    if fns.init(buf) != 1:
        raise fail(f"{layout.prefix}_Init failed")
    if guarded() != layout.initial():
        raise fail("the context after Init is not the expected struct")
    message = bytes(range(256)) * 5  # several blocks and a partial one
    reference = hashlib.new(layout.method, usedforsecurity=False)
    fed = 0
    for piece in (message[:3], message[3:70], message[70:200], message[200:]):
        if fns.update(buf, piece, len(piece)) != 1:
            raise fail(f"{layout.prefix}_Update failed")
        reference.update(piece)
        fed += len(piece)
        nl, nh, num = layout.counters(guarded())
        if (nl, nh, num) != (fed * 8, 0, fed % _BLOCK):
            raise fail(f"counters (Nl, Nh, num) = {(nl, nh, num)} after {fed} bytes")
    out = ctypes.create_string_buffer(layout.digest_size)
    if fns.final(out, buf) != 1:
        raise fail(f"{layout.prefix}_Final failed")
    guarded()
    if out.raw != reference.digest():
        raise fail("its digest differs from hashlib's")


@functools.cache
def _functions() -> dict[DigestMethod, _Functions]:
    """libcrypto's functions, bound and probed once per process; RuntimeError if unusable."""
    if struct.calcsize("=I") != ctypes.sizeof(ctypes.c_uint):
        raise RuntimeError("unsigned int is not 32 bits on this platform")
    lib = _load_library()
    bound = {method: _bind(lib, layout) for method, layout in _LAYOUTS.items()}
    for method, fns in bound.items():
        _probe(_LAYOUTS[method], fns)
    return bound


@functools.cache
def _availability() -> tuple[dict[DigestMethod, _Functions] | None, str]:
    try:
        return _functions(), ""
    except RuntimeError as err:
        return None, str(err)
    except (OSError, ValueError, TypeError, AttributeError) as err:  # anything odd from ctypes
        return None, f"libcrypto unusable: {err!r}"


def available() -> bool:
    """Whether resumable hashing works here (libcrypto loaded and probed; cached).

    When false, :class:`ResumableHash` raises :class:`RuntimeError`; callers do not resume.
    """
    return _availability()[0] is not None


def _require() -> dict[DigestMethod, _Functions]:
    fns, why = _availability()
    if fns is None:
        raise RuntimeError(f"resumable hashing is not available: {why}")
    return fns


class ResumableHash:
    """A running SHA-256 or MD5 whose state survives a process: :meth:`state`, :meth:`restore`.

    ``hashlib``-like (``update``, ``digest``, ``hexdigest``, ``copy``, ``name``,
    ``digest_size``). Thread-safe; updates release the GIL.
    """

    __slots__ = ("_ctx", "_fns", "_layout", "_lock")

    def __init__(self, method: DigestMethod) -> None:
        """A fresh hash. ValueError for an unknown method, RuntimeError if not :func:`available`."""
        layout = _LAYOUTS.get(method)
        if layout is None:
            raise ValueError(
                f"unknown digest method {method!r}: expected one of {sorted(_LAYOUTS)}"
            )
        self._fns = _require()[method]
        self._layout = layout
        self._ctx = (ctypes.c_char * layout.ctx_size)()
        self._lock = threading.Lock()
        self._call(self._fns.init, self._ctx)

    @property
    def name(self) -> DigestMethod:
        return self._layout.method

    @property
    def digest_size(self) -> int:
        return self._layout.digest_size

    @property
    def bytes_hashed(self) -> int:
        """How many bytes went in so far (from the context's counters; modulo 2**61)."""
        with self._lock:
            nl, nh, _ = self._layout.counters(bytes(self._ctx))
        return ((nh << 32) | nl) >> 3

    def _call(self, fn: Callable[..., int], *args: object) -> None:
        if fn(*args) != 1:
            raise RuntimeError(f"libcrypto {self._layout.prefix} call failed")

    def _feed(self, data: bytes | ctypes.Array[ctypes.c_char], n: int) -> None:
        # Both pass to the c_char_p parameter as a pointer to their own buffer: no copy.
        with self._lock:
            self._call(self._fns.update, self._ctx, data, n)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash more bytes (any C-contiguous buffer; the GIL is released while hashing)."""
        if isinstance(data, bytes):
            if data:
                self._feed(data, len(data))
            return
        with memoryview(data) as view:
            if not view.c_contiguous:
                raise BufferError("ResumableHash.update: the buffer is not C-contiguous")
            with view.cast("B") as flat:
                n = flat.nbytes
                if n == 0:
                    return
                if not flat.readonly:
                    arr = (ctypes.c_char * n).from_buffer(flat)
                    try:
                        self._feed(arr, n)
                    finally:
                        del arr  # release the buffer export before the views are released
                    return
                obj = flat.obj
                if type(obj) is bytes and len(obj) == n:  # a whole bytes object: no copy
                    self._feed(obj, n)
                    return
                for start in range(0, n, _COPY_CHUNK):  # read-only: copy, a bounded slice at a time
                    piece = flat[start : start + _COPY_CHUNK].tobytes()
                    self._feed(piece, len(piece))

    def _snapshot(self) -> ctypes.Array[ctypes.c_char]:
        with self._lock:
            return (ctypes.c_char * self._layout.ctx_size).from_buffer_copy(self._ctx)

    def digest(self) -> bytes:
        """The digest of everything so far; the running state is left as it was."""
        ctx = self._snapshot()  # Final wipes the context it finishes: finish a copy
        out = ctypes.create_string_buffer(self._layout.digest_size)
        self._call(self._fns.final, out, ctx)
        return out.raw

    def hexdigest(self) -> str:
        """:meth:`digest` as lowercase hex."""
        return self.digest().hex()

    def copy(self) -> ResumableHash:
        """An independent hash with the same state."""
        twin = ResumableHash(self._layout.method)
        ctypes.memmove(twin._ctx, self._snapshot(), self._layout.ctx_size)
        return twin

    def state(self) -> str:
        """The running state as a string to persist: ``"<method>:<hex of the context>"``.

        Only meaningful to :meth:`restore` on the same machine and library.
        """
        return f"{self._layout.method}:{bytes(self._snapshot()).hex()}"

    @classmethod
    def restore(cls, state: str) -> Self:
        """The hash a :meth:`state` string was saved from. ValueError if the string is malformed."""
        if not isinstance(state, str):
            raise ValueError(f"hash state: expected a string, got {type(state).__name__}")
        match = _STATE_RE.fullmatch(state)
        if match is None:
            shown = state if len(state) <= 40 else state[:40] + "..."
            raise ValueError(f"hash state {shown!r}: expected '<method>:<lowercase hex>'")
        method, hex_ctx = match.group(1), match.group(2)
        layout = next((lay for lay in _LAYOUTS.values() if lay.method == method), None)
        if layout is None:
            raise ValueError(
                f"hash state: unknown method {method!r}, expected one of {sorted(_LAYOUTS)}"
            )
        if len(hex_ctx) != 2 * layout.ctx_size:
            raise ValueError(
                f"hash state: {method} context has {len(hex_ctx)} hex digits, "
                f"expected {2 * layout.ctx_size}"
            )
        raw = bytes.fromhex(hex_ctx)
        why = layout.check(raw)
        if why is not None:
            raise ValueError(f"hash state: inconsistent {method} context: {why}")
        restored = cls(layout.method)
        ctypes.memmove(restored._ctx, raw, layout.ctx_size)
        return restored

    def __repr__(self) -> str:
        return f"<ResumableHash {self._layout.method} after {self.bytes_hashed} bytes>"
