"""updater.digest: resumable SHA-256/MD5 over libcrypto, checked against hashlib.

The state must survive a process: one test restores it in a separate Python process and back.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from updater import digest
from updater.digest import ResumableHash, available
from updater.task import DigestMethod

REPO = Path(__file__).resolve().parent.parent
METHODS: tuple[DigestMethod, ...] = ("sha256", "md5")
CTX_SIZE = {"sha256": 112, "md5": 92}

methods = st.sampled_from(METHODS)
payloads = st.binary(max_size=4096)


def reference(method: DigestMethod, data: bytes) -> str:
    return hashlib.new(method, data, usedforsecurity=False).hexdigest()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_available() -> None:
    # This machine has libcrypto: a skip here would hide a broken probe.
    assert available()
    assert available()  # cached


@pytest.mark.parametrize("method", METHODS)
def test_known_answers(method: DigestMethod) -> None:
    expected = {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "md5": "900150983cd24fb0d6963f7d28e17f72",
    }[method]
    h = ResumableHash(method)
    h.update(b"abc")
    assert h.hexdigest() == expected
    assert h.digest() == bytes.fromhex(expected)
    assert h.name == method
    assert h.digest_size == len(expected) // 2
    assert ResumableHash(method).hexdigest() == reference(method, b"")


@given(method=methods, data=payloads, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_random_chunking_equals_hashlib(method: DigestMethod, data: bytes, cuts: list[int]) -> None:
    h = ResumableHash(method)
    for chunk in split(data, cuts):
        h.update(chunk)
    assert h.hexdigest() == reference(method, data)
    assert h.bytes_hashed == len(data)


@given(
    method=methods,
    data=payloads,
    at=st.integers(min_value=0),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_state_restored_in_a_fresh_object(
    method: DigestMethod, data: bytes, at: int, cuts: list[int]
) -> None:
    at %= len(data) + 1
    h = ResumableHash(method)
    for chunk in split(data[:at], cuts):
        h.update(chunk)
    saved = h.state()
    assert saved.startswith(f"{method}:")
    assert len(saved) == len(method) + 1 + 2 * CTX_SIZE[method]
    json.loads(json.dumps({"hash": saved}))  # fits a JSON journal as is

    del h
    resumed = ResumableHash.restore(saved)
    assert resumed.bytes_hashed == at
    for chunk in split(data[at:], cuts):
        resumed.update(chunk)
    assert resumed.hexdigest() == reference(method, data)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from updater.digest import ResumableHash
    job = json.load(sys.stdin)
    h = ResumableHash.restore(job["state"])
    h.update(bytes.fromhex(job["more"]))
    json.dump({"hexdigest": h.hexdigest(), "state": h.state()}, sys.stdout)
    """
)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [1, 2])
def test_state_survives_a_process(method: DigestMethod, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(10_000, 300_000))
    a, b = sorted(rng.sample(range(len(data) + 1), 2))

    h = ResumableHash(method)
    h.update(data[:a])
    job = {"state": h.state(), "more": data[a:b].hex()}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    answer = json.loads(child.stdout)
    assert answer["hexdigest"] == reference(method, data[:b])

    back = ResumableHash.restore(answer["state"])  # and back into this process
    back.update(data[b:])
    assert back.hexdigest() == reference(method, data)


@given(method=methods, data=payloads, peeks=st.lists(st.integers(min_value=0), max_size=8))
def test_hexdigest_midstream_leaves_the_state_alone(
    method: DigestMethod, data: bytes, peeks: list[int]
) -> None:
    h = ResumableHash(method)
    done = 0
    for chunk in split(data, peeks):
        h.update(chunk)
        done += len(chunk)
        before = h.state()
        assert h.hexdigest() == reference(method, data[:done])
        assert h.hexdigest() == reference(method, data[:done])
        assert h.state() == before
    assert h.hexdigest() == reference(method, data)


@pytest.mark.parametrize("method", METHODS)
def test_copy_is_independent(method: DigestMethod) -> None:
    h = ResumableHash(method)
    h.update(b"common ")
    twin = h.copy()
    h.update(b"left")
    twin.update(b"right")
    assert h.hexdigest() == reference(method, b"common left")
    assert twin.hexdigest() == reference(method, b"common right")


def _good_state(method: DigestMethod, data: bytes = b"x" * 100) -> str:
    h = ResumableHash(method)
    h.update(data)
    return h.state()


def _with_word(state: str, index: int, value: int) -> str:
    method, hex_ctx = state.split(":")
    raw = bytearray(bytes.fromhex(hex_ctx))
    raw[4 * index : 4 * index + 4] = value.to_bytes(4, sys.byteorder)
    return f"{method}:{raw.hex()}"


SHA = _good_state("sha256")
MD5 = _good_state("md5")
# word indexes: sha256 h[0..7] Nl=8 Nh=9 data=10..25 num=26 md_len=27; md5 A..D Nl=4 Nh=5 num=22
MALFORMED = {
    "empty": "",
    "no method": SHA.split(":")[1],
    "no context": "sha256:",
    "unknown method": "sha1:" + SHA.split(":")[1],
    "upper-case method": "SHA256:" + SHA.split(":")[1],
    "method of the other length": "md5:" + SHA.split(":")[1],
    "one digit short": SHA[:-1],
    "one byte short": SHA[:-2],
    "one byte long": SHA + "00",
    "md5 too long": MD5 + "00",
    "non-hex": SHA[:-2] + "zz",
    "upper-case hex": SHA.upper().replace("SHA256", "sha256"),
    "whitespace": SHA[:20] + " " + SHA[21:],
    "trailing newline": SHA + "\n",
    "two colons": "sha256:" + SHA,
    "num past the block": _with_word(_with_word(SHA, 26, 100), 8, 800),
    "num huge": _with_word(SHA, 26, 0xFFFFFFFF),
    "num off the counter": _with_word(SHA, 26, 5),
    "bit counter not whole bytes": _with_word(SHA, 8, 801),
    "md_len wrong": _with_word(SHA, 27, 28),
    "md5 num past the block": _with_word(_with_word(MD5, 22, 64), 4, 64 * 8),
    "md5 num off the counter": _with_word(MD5, 22, 1),
}


@pytest.mark.parametrize("state", MALFORMED.values(), ids=MALFORMED.keys())
def test_restore_refuses_malformed_states(state: str) -> None:
    with pytest.raises(ValueError, match="hash state"):
        ResumableHash.restore(state)


def test_restore_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="hash state"):
        ResumableHash.restore(SHA.encode())  # type: ignore[arg-type]


def test_restore_accepts_what_state_wrote() -> None:
    for state in (SHA, MD5, ResumableHash("sha256").state(), ResumableHash("md5").state()):
        assert ResumableHash.restore(state).state() == state


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown digest method"):
        ResumableHash("sha1")  # type: ignore[arg-type]


def test_unavailable_raises_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digest, "_availability", lambda: (None, "no libcrypto here"))
    assert not available()
    with pytest.raises(RuntimeError, match="not available: no libcrypto here"):
        ResumableHash("sha256")
    with pytest.raises(RuntimeError, match="not available"):
        ResumableHash.restore(SHA)


@pytest.mark.parametrize("method", METHODS)
def test_update_accepts_buffers(method: DigestMethod) -> None:
    data = bytes(range(256)) * 40
    big = random.Random(7).randbytes(3 * (1 << 20) + 12345)  # > the 1 MiB copy slices
    ints = array.array("I", range(1000))
    h = ResumableHash(method)
    expected = hashlib.new(method, usedforsecurity=False)
    pieces: list[bytes | bytearray | memoryview] = [
        data,
        bytearray(data),
        memoryview(bytearray(data))[10:2000],  # writable slice
        memoryview(data),  # read-only, the whole bytes object
        memoryview(data)[7:3001],  # read-only slice
        memoryview(data).toreadonly()[1:],
        memoryview(bytearray(data)).toreadonly()[5:50],  # read-only view of a writable buffer
        memoryview(big)[1:],  # read-only, copied in bounded slices
        memoryview(ints),  # multi-byte items: their bytes are hashed
        memoryview(ints).cast("B").cast("I", [10, 100]),  # two dimensions, C-contiguous
        b"",
        bytearray(),
        memoryview(b""),
        memoryview(bytearray(10))[5:5],
    ]
    for piece in pieces:
        h.update(piece)
        expected.update(piece)
    assert h.hexdigest() == expected.hexdigest()


def test_update_releases_the_buffer_export() -> None:
    buf = bytearray(b"abc")
    h = ResumableHash("sha256")
    h.update(buf)
    h.update(memoryview(buf))
    buf.extend(b"def")  # would raise BufferError if an export were still held
    h.update(buf)
    assert h.hexdigest() == reference("sha256", b"abcabcabcdef")


def test_update_refuses_non_contiguous_buffers_like_hashlib() -> None:
    view = memoryview(b"abcdef")[::2]
    with pytest.raises(BufferError):
        hashlib.sha256(view)
    with pytest.raises(BufferError):
        ResumableHash("sha256").update(view)


def test_shared_between_threads() -> None:
    data = random.Random(3).randbytes(1 << 20)
    h = ResumableHash("sha256")
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]

    def feed() -> None:
        for chunk in chunks:
            h.update(chunk)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The order across threads is arbitrary, but no update may be lost or torn.
    assert h.bytes_hashed == 4 * len(data)


@settings(max_examples=20)
@given(method=methods, data=st.binary(min_size=1, max_size=300))
def test_repr_and_counter(method: DigestMethod, data: bytes) -> None:
    h = ResumableHash(method)
    h.update(data)
    assert repr(h) == f"<ResumableHash {method} after {len(data)} bytes>"


def test_throughput_sanity(capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion on speed: prints MiB/s so a regression to Python speed shows."""
    chunk = random.Random(0).randbytes(1 << 20)
    total_mib = 256
    lines = []
    for method in METHODS:
        ours = ResumableHash(method)
        start = time.perf_counter()
        for _ in range(total_mib):
            ours.update(chunk)
        ours_s = time.perf_counter() - start
        theirs = hashlib.new(method, usedforsecurity=False)
        start = time.perf_counter()
        for _ in range(total_mib):
            theirs.update(chunk)
        theirs_s = time.perf_counter() - start
        assert ours.hexdigest() == theirs.hexdigest()
        lines.append(
            f"{method}: {total_mib} MiB in 1 MiB updates: ResumableHash {ours_s:.3f} s "
            f"({total_mib / ours_s:.0f} MiB/s), hashlib {theirs_s:.3f} s "
            f"({total_mib / theirs_s:.0f} MiB/s)"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
