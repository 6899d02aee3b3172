"""Tests of updater.task: the valid task forms, a table of hostile tasks, and properties.

The hostile table asserts the ``field`` of each refusal, because the field is what an operator
reads in the ``desc`` of the failed progress report. The properties check the promise the
agent relies on: whatever arrives, ``parse_task`` returns a Task or raises TaskError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import string
from collections.abc import Callable
from typing import Final
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from updater.errors import InvalidInput, TaskError
from updater.task import (
    MAX_DEPTH,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_JSON_BYTES,
    DigestMethod,
    FileSpec,
    NoTaskPending,
    Task,
    parse_task,
    task_to_json,
)

MD5: Final = hashlib.md5(b"boot").hexdigest()
SHA_A: Final = hashlib.sha256(b"boot").hexdigest()
SHA_B: Final = hashlib.sha256(b"root").hexdigest()
SINGLE_URL: Final = (
    "https://ota-cn.oss-cn-shanghai.aliyuncs.com/ota/a1b2/fw%20v2.bin"
    "?Expires=1700000000&OSSAccessKeyId=LTAI&Signature=a%2Fb%2Bc%3D&x=1&x=2"
)
DROP: Final = object()  # a value for the builders below: remove the key

PROPERTY_SETTINGS: Final = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- builders ------------------------------------------------------------------------------------


def _apply(base: dict[str, object], changes: dict[str, object]) -> dict[str, object]:
    """``base`` with ``changes`` applied; a change to DROP removes the key."""
    result = dict(base)
    for key, value in changes.items():
        if value is DROP:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def single(**changes: object) -> dict[str, object]:
    """A valid single-file ``data`` object (MD5, as the console sends it), with changes."""
    base: dict[str, object] = {
        "version": "2.0.0",
        "size": 432945,
        "url": SINGLE_URL,
        "sign": MD5,
        "signMethod": "Md5",
        "md5": MD5,
    }
    return _apply(base, changes)


def entry_url(name: str) -> str:
    return f"https://oss.example.com/pkg/{name}?Signature=x%2By&Expires=1"


def entry(name: str = "boot.img", **changes: object) -> dict[str, object]:
    """A valid element of ``files`` (SHA-256), with changes."""
    base: dict[str, object] = {
        "fileName": name,
        "fileSize": 4096,
        "fileUrl": entry_url(name),
        "fileSign": SHA_A,
    }
    return _apply(base, changes)


def multi(*entries: dict[str, object], **changes: object) -> dict[str, object]:
    """A valid multi-file ``data`` object (two files unless given), with changes."""
    files = list(entries) if entries else [entry("boot.img"), entry("root.img", fileSign=SHA_B)]
    base: dict[str, object] = {
        "version": "a1b1",
        "signMethod": "SHA256",
        "module": "default",
        "files": files,
    }
    return _apply(base, changes)


def multi_entry(index: int, **changes: object) -> dict[str, object]:
    """A multi-file task of three files whose ``files[index]`` has changes."""
    files = [entry(f"part{i}.img") for i in range(3)]
    files[index] = _apply(files[index], changes)
    return multi(*files)


def push(data: object) -> dict[str, object]:
    return {"code": "1000", "data": data, "id": 1626969597472, "message": "success"}


def get_reply(data: object) -> dict[str, object]:
    return {"id": "123", "code": 200, "data": data}


def nested(depth: int) -> object:
    """``depth`` arrays, one inside the other."""
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


def padded_text(total_bytes: int) -> str:
    """Compact JSON text of a valid task padded through extData to exactly ``total_bytes``."""
    base = json.dumps(single(extData={"pad": ""}), separators=(",", ":"))
    return json.dumps(
        single(extData={"pad": "x" * (total_bytes - len(base))}), separators=(",", ":")
    )


def refusal(raw: object) -> TaskError:
    with pytest.raises(TaskError) as caught:
        parse_task(raw)
    return caught.value


# --- valid forms ---------------------------------------------------------------------------------


def test_push_envelope_single_file() -> None:
    task = parse_task(json.dumps(push(single(module="MCU"))))
    assert task == Task(
        version="2.0.0",
        digest_method="md5",
        files=(FileSpec(name="fw v2.bin", size=432945, url=SINGLE_URL, digest=MD5),),
        module="MCU",
    )
    assert task.total_size == 432945


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(json.dumps(push(multi())), id="push-str"),
        pytest.param(json.dumps(push(multi())).encode(), id="push-bytes"),
        pytest.param(bytearray(json.dumps(push(multi())).encode()), id="push-bytearray"),
        pytest.param(push(multi()), id="push-object"),
        pytest.param(json.dumps(get_reply(multi())), id="get-reply-str"),
        pytest.param(get_reply(multi()), id="get-reply-object"),
        pytest.param(json.dumps(multi(), indent=4), id="bare-str-indented"),
        pytest.param(b"\xef\xbb\xbf" + json.dumps(multi()).encode(), id="bare-bytes-bom"),
        pytest.param(multi(), id="bare-object"),
    ],
)
def test_every_intake_form_gives_the_same_task(raw: object) -> None:
    expected = Task(
        version="a1b1",
        digest_method="sha256",
        files=(
            FileSpec("boot.img", 4096, entry_url("boot.img"), SHA_A),
            FileSpec("root.img", 4096, entry_url("root.img"), SHA_B),
        ),
        module="default",
    )
    assert parse_task(raw) == expected


@pytest.mark.parametrize("envelope", [push, get_reply], ids=["push", "get-reply"])
def test_empty_data_means_nothing_pending(envelope: Callable[[object], object]) -> None:
    error = refusal(json.dumps(envelope({})))
    assert isinstance(error, NoTaskPending)
    assert isinstance(error, InvalidInput)
    assert error.field == "data"


def test_multi_file_md5_with_file_md5_only() -> None:
    task = parse_task(multi(entry("a.bin", fileSign=DROP, fileMd5=MD5), signMethod="MD5"))
    assert task.digest_method == "md5"
    assert task.files[0].digest == MD5


def test_multi_file_md5_with_both_digests_agreeing_in_any_case() -> None:
    raw = multi(entry("a.bin", fileSign=MD5.upper(), fileMd5=MD5), signMethod="md5")
    assert parse_task(raw).files[0].digest == MD5


def test_sha256_task_ignores_file_md5() -> None:
    task = parse_task(multi(entry("a.bin", fileMd5="not even hex")))
    assert task.files[0].digest == SHA_A


def test_single_file_md5_fallback_and_optional_md5() -> None:
    assert parse_task(single(sign=DROP)).files[0].digest == MD5
    assert parse_task(single(md5=DROP)).files[0].digest == MD5


def test_hex_digests_are_stored_lowercase() -> None:
    task = parse_task(multi(entry("a.bin", fileSign=SHA_A.upper())))
    assert task.files[0].digest == SHA_A
    assert parse_task(single(sign=MD5.upper(), md5=MD5.upper())).files[0].digest == MD5


@pytest.mark.parametrize(
    ("sign_method", "expected"),
    [
        ("Md5", "md5"),
        ("MD5", "md5"),
        ("md5", "md5"),
        ("mD5", "md5"),
        ("SHA256", "sha256"),
        ("Sha256", "sha256"),
        ("sha256", "sha256"),
    ],
)
def test_sign_method_is_case_insensitive(sign_method: str, expected: str) -> None:
    digest = MD5 if expected == "md5" else SHA_A
    task = parse_task(multi(entry("a.bin", fileSign=digest), signMethod=sign_method))
    assert task.digest_method == expected


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (SINGLE_URL, "fw v2.bin"),
        ("https://h.example/a/b/boot.img", "boot.img"),
        ("https://h.example/boot.img?name=other.img#frag", "boot.img"),
        ("https://h.example:8443/d/%E5%9B%BA%E4%BB%B6.bin?a=%2F", "固件.bin"),
        ("HTTPS://h.example/x/root%2Eimg", "root.img"),
        ("https://user:pw@[::1]:443/x/rootfs.ext4", "rootfs.ext4"),
    ],
)
def test_single_file_name_and_url_kept_exactly(url: str, name: str) -> None:
    spec = parse_task(single(url=url)).files[0]
    assert spec.name == name
    assert spec.url == url


def test_multi_file_query_string_kept_exactly() -> None:
    url = "https://b.example/p/a.bin?X-Amz-Signature=ab%2Bcd%3D%3D&X-Amz-Date=20240101T000000Z&a=&b"
    assert parse_task(multi(entry("a.bin", fileUrl=url))).files[0].url == url


def test_optional_fields_are_kept() -> None:
    ext = {"_package_udi": '{"moduleName":"MCU"}', "k": [1, {"x": None}]}
    signature = "QUJD" * 86 + "QQ=="
    task = parse_task(single(extData=ext, digestsign=signature, module="MCU"))
    assert task.ext_data == ext
    assert task.ext_data["_package_udi"] == '{"moduleName":"MCU"}'
    assert task.digestsign == signature
    assert task.module == "MCU"


def test_unknown_keys_and_nulls_are_ignored() -> None:
    raw = multi(
        entry("a.bin", fileVersion="a1", fileMd5=None),
        streamId=None,
        module=None,
        extData=None,
        digestsign=None,
        dProtocol=None,
        isDiff=None,
        size=None,
        url=None,
        comment="hello",
    )
    task = parse_task(raw)
    assert task.module is None
    assert task.ext_data == {}
    assert task.digestsign is None


@pytest.mark.parametrize("protocol", ["https", "HTTPS", ""])
def test_https_download_protocol_accepted(protocol: str) -> None:
    assert parse_task(single(dProtocol=protocol, isDiff=0)).is_diff is False


def test_empty_digestsign_means_none() -> None:
    assert parse_task(single(digestsign="")).digestsign is None


def test_boundaries_accepted() -> None:
    files = [entry(f"f{i}", fileSize=1) for i in range(MAX_FILES - 1)]
    files.append(entry("last", fileSize=MAX_FILE_SIZE))
    task = parse_task(multi(*files, version="v" * 64, module="m" * 64))
    assert len(task.files) == MAX_FILES
    assert task.total_size == MAX_FILE_SIZE + MAX_FILES - 1
    name = "n" * 255
    assert parse_task(multi(entry(name))).files[0].name == name
    url = "https://h/a.bin?q=" + "x" * (4096 - 18)
    assert parse_task(single(url=url)).files[0].url == url


@pytest.mark.parametrize("as_text", [True, False], ids=["text", "object"])
def test_depth_limit_is_inclusive(as_text: bool) -> None:
    ok = single(extData={"deep": nested(MAX_DEPTH - 2)})  # data, extData, then the arrays
    too_deep = single(extData={"deep": nested(MAX_DEPTH - 1)})
    parse_task(json.dumps(ok) if as_text else ok)
    assert refusal(json.dumps(too_deep) if as_text else too_deep).field == "$"


@pytest.mark.parametrize("form", ["str", "bytes", "object"])
def test_size_limit_is_inclusive(form: str) -> None:
    def convert(text: str) -> object:
        if form == "str":
            return text
        return text.encode() if form == "bytes" else json.loads(text)

    parse_task(convert(padded_text(MAX_JSON_BYTES)))
    assert refusal(convert(padded_text(MAX_JSON_BYTES + 1))).field == "$"


def test_task_shares_nothing_with_the_callers_object() -> None:
    raw = single(extData={"list": [1]})
    task = parse_task(raw)
    ext = raw["extData"]
    assert isinstance(ext, dict)
    ext["list"].append(2)
    assert task.ext_data == {"list": [1]}


# --- task_id and task_to_json --------------------------------------------------------------------


def test_task_id_is_stable_across_redeliveries() -> None:
    first = parse_task(json.dumps(push(single()), sort_keys=True))
    again = parse_task(json.dumps({**push(single(extData={"a": 1})), "id": 99}, indent=2))
    via_get = parse_task(get_reply(single(signMethod="MD5", sign=MD5.upper())))
    assert first.task_id == again.task_id == via_get.task_id
    assert len(first.task_id) == 16
    assert all(c in string.hexdigits.lower() for c in first.task_id)


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(single(version="2.0.1"), id="version"),
        pytest.param(single(module="MCU"), id="module"),
        pytest.param(single(size=432946), id="size"),
        pytest.param(single(sign="0" * 32, md5=DROP), id="digest"),
    ],
)
def test_task_id_changes_with_content(changed: dict[str, object]) -> None:
    assert parse_task(changed).task_id != parse_task(single()).task_id


def test_task_id_ignores_a_re_presigned_url() -> None:
    """The platform re-sends a package with a fresh presigned URL; a resume must recognise it."""
    again = parse_task(single(url=SINGLE_URL.replace("x=2", "x=3")))
    assert again.task_id == parse_task(single()).task_id


def test_single_file_task_round_trips_as_multi_file() -> None:
    task = parse_task(push(single(extData={"k": "v"}, digestsign="AAAA", module="MCU")))
    data = task_to_json(task)
    assert "files" in data
    again = parse_task(json.dumps(data))
    assert again == task
    assert again.ext_data == task.ext_data
    assert again.task_id == task.task_id


# --- hostile tasks -------------------------------------------------------------------------------

LONG: Final = "x" * 5000

HOSTILE: Final = [
    # the document as a whole
    pytest.param("[]", "$", id="top-level-array"),
    pytest.param('"task"', "$", id="top-level-string"),
    pytest.param("42", "$", id="top-level-number"),
    pytest.param("null", "$", id="top-level-null"),
    pytest.param([multi()], "$", id="top-level-array-object"),
    pytest.param(None, "$", id="python-none"),
    pytest.param(3.5, "$", id="python-float"),
    pytest.param("", "$", id="empty-text"),
    pytest.param(b"", "$", id="empty-bytes"),
    pytest.param("{", "$", id="truncated-json"),
    pytest.param("{'version': '1'}", "$", id="single-quotes"),
    pytest.param(json.dumps(multi()) + "x", "$", id="trailing-garbage"),
    pytest.param(b'{"version": "\xff\xfe"}', "$", id="invalid-utf8"),
    pytest.param(b"\xc0\xaf", "$", id="overlong-utf8"),
    pytest.param(json.dumps(multi()).encode("utf-16"), "$", id="utf16-bytes"),
    pytest.param(json.dumps(single(size=float("nan"))), "$", id="nan-size-text"),
    pytest.param(json.dumps(single(extData={"x": float("inf")})), "$", id="infinity-text"),
    pytest.param(json.dumps(single(extData={"x": -float("inf")})), "$", id="neg-infinity-text"),
    pytest.param(json.dumps(single()).replace("432945", "1e999"), "$", id="float-overflow"),
    pytest.param(single(size=float("nan")), "$", id="nan-size-object"),
    pytest.param(single(extData={"x": float("nan")}), "$", id="nan-object"),
    pytest.param(json.dumps(single()).replace("432945", "9" * 5000), "$", id="int-5000-digits"),
    pytest.param(single(extData={"x": 10**5000}), "$", id="int-5000-digits-object"),
    pytest.param('{"version":"1","version":"2"}', "$", id="duplicate-key"),
    pytest.param(single(extData={"s": {1, 2}}), "$", id="set-value"),
    pytest.param(single(extData={1: "a"}), "$", id="int-key"),
    pytest.param(single(extData={"b": b"bytes"}), "$", id="bytes-value"),
    pytest.param(single(extData=("a", "b")), "$", id="tuple-value"),
    pytest.param("[" * 100_000 + "]" * 100_000, "$", id="deep-array-text"),
    pytest.param('{"a":' * 20_000 + "1" + "}" * 20_000, "$", id="deep-object-text"),
    pytest.param(b"[" * 200_000, "$", id="deep-unbalanced-bytes"),
    pytest.param(nested(100_000), "$", id="deep-array-object"),
    pytest.param(single(extData={"d": nested(MAX_DEPTH)}), "$", id="deep-in-extdata"),
    pytest.param('"' + '\\"' * 100_000, "$", id="unterminated-escaped-string"),
    pytest.param('["' * 60_000, "$", id="many-unterminated-strings"),
    pytest.param('"' + '\\"' * 100_000 + "[" * 40, "$", id="unterminated-then-brackets"),
    pytest.param(json.dumps(single(extData={"p": "x" * MAX_JSON_BYTES})), "$", id="huge-text"),
    pytest.param(b" " * (MAX_JSON_BYTES + 1), "$", id="huge-bytes"),
    pytest.param(single(extData={"p": "x" * MAX_JSON_BYTES}), "$", id="huge-object"),
    pytest.param(single(extData={"p": [0] * MAX_JSON_BYTES}), "$", id="huge-list-object"),
    pytest.param("é" * (MAX_JSON_BYTES // 2 + 1), "$", id="huge-in-utf8-only"),
    # envelopes
    pytest.param(push([]), "data", id="data-array"),
    pytest.param(push("x"), "data", id="data-string"),
    pytest.param(get_reply(None), "data", id="data-null"),
    # version
    pytest.param(single(version=DROP), "version", id="version-missing"),
    pytest.param(single(version=None), "version", id="version-null"),
    pytest.param(single(version=2), "version", id="version-int"),
    pytest.param(single(version=""), "version", id="version-empty"),
    pytest.param(single(version="v" * 65), "version", id="version-65"),
    pytest.param(single(version="1.0 beta"), "version", id="version-space"),
    pytest.param(single(version="1.0\n"), "version", id="version-newline"),
    pytest.param(single(version="1.0\x00"), "version", id="version-nul"),
    pytest.param(single(version="版本1"), "version", id="version-non-ascii"),
    # signMethod
    pytest.param(single(signMethod=DROP), "signMethod", id="method-missing"),
    pytest.param(single(signMethod="SHA1"), "signMethod", id="method-sha1"),
    pytest.param(single(signMethod="SHA-256"), "signMethod", id="method-sha-256"),
    pytest.param(single(signMethod=""), "signMethod", id="method-empty"),
    pytest.param(single(signMethod=5), "signMethod", id="method-int"),
    # transfer modes refused by name
    pytest.param(single(dProtocol="mqtt"), "dProtocol", id="dprotocol-mqtt"),
    pytest.param(single(dProtocol="MQTT", url=DROP), "dProtocol", id="dprotocol-mqtt-no-url"),
    pytest.param(single(dProtocol="coap"), "dProtocol", id="dprotocol-coap"),
    pytest.param(single(dProtocol=1), "dProtocol", id="dprotocol-int"),
    pytest.param(single(isDiff=1), "isDiff", id="isdiff-1"),
    pytest.param(multi(isDiff=1), "isDiff", id="isdiff-1-multi"),
    pytest.param(single(isDiff=True), "isDiff", id="isdiff-true"),
    pytest.param(single(isDiff="1"), "isDiff", id="isdiff-string"),
    pytest.param(single(isDiff=2), "isDiff", id="isdiff-2"),
    pytest.param(single(isDiff=-1), "isDiff", id="isdiff-negative"),
    # single-file size
    pytest.param(single(size=DROP), "size", id="size-missing"),
    pytest.param(single(size="432945"), "size", id="size-string"),
    pytest.param(single(size=432945.0), "size", id="size-float"),
    pytest.param(single(size=True), "size", id="size-true"),
    pytest.param(single(size=False), "size", id="size-false"),
    pytest.param(single(size=0), "size", id="size-zero"),
    pytest.param(single(size=-1), "size", id="size-negative"),
    pytest.param(single(size=MAX_FILE_SIZE + 1), "size", id="size-over-64gib"),
    pytest.param(single(size=10**30), "size", id="size-huge"),
    pytest.param(single(size=[1]), "size", id="size-array"),
    # single-file digests
    pytest.param(single(sign=DROP, md5=DROP), "sign", id="sign-missing"),
    pytest.param(single(sign=MD5[:-1], md5=DROP), "sign", id="sign-31"),
    pytest.param(single(sign=MD5 + "0", md5=DROP), "sign", id="sign-33"),
    pytest.param(single(sign="g" * 32, md5=DROP), "sign", id="sign-non-hex"),
    pytest.param(single(sign=" " + MD5[1:], md5=DROP), "sign", id="sign-space"),
    pytest.param(single(sign="٣" * 32, md5=DROP), "sign", id="sign-unicode-digits"),
    pytest.param(single(sign=SHA_A, md5=DROP), "sign", id="sign-sha-length-for-md5"),
    pytest.param(single(sign=MD5, signMethod="SHA256"), "sign", id="sign-md5-length-for-sha"),
    pytest.param(single(sign=12345, md5=DROP), "sign", id="sign-int"),
    pytest.param(single(md5="0" * 32), "md5", id="md5-disagrees"),
    pytest.param(single(md5="z" * 32), "md5", id="md5-non-hex"),
    pytest.param(single(md5=True), "md5", id="md5-bool"),
    # single-file url and the name derived from it
    pytest.param(single(url=DROP), "url", id="url-missing"),
    pytest.param(single(url="http://h.example/fw.bin"), "url", id="url-http"),
    pytest.param(single(url="ftp://h.example/fw.bin"), "url", id="url-ftp"),
    pytest.param(single(url="file:///etc/passwd"), "url", id="url-file"),
    pytest.param(single(url="//h.example/fw.bin"), "url", id="url-no-scheme"),
    pytest.param(single(url="https:/h.example/fw.bin"), "url", id="url-one-slash"),
    pytest.param(single(url="https://h.example/fw 1.bin"), "url", id="url-space"),
    pytest.param(single(url="https://h.example/fw.bin\r\nX: y"), "url", id="url-crlf"),
    pytest.param(single(url="https://h.example/fw.bin\t"), "url", id="url-tab"),
    pytest.param(single(url="https://h.example/\x00.bin"), "url", id="url-nul"),
    pytest.param(single(url="https://h.example/\x7f.bin"), "url", id="url-del"),
    pytest.param(single(url="https://hé.example/fw.bin"), "url", id="url-non-ascii"),
    pytest.param(single(url="https:///fw.bin"), "url", id="url-no-host"),
    pytest.param(single(url="https://"), "url", id="url-scheme-only"),
    pytest.param(single(url="https://user@/fw.bin"), "url", id="url-userinfo-no-host"),
    pytest.param(single(url="https://h.example:99999/fw.bin"), "url", id="url-port-range"),
    pytest.param(single(url="https://h.example:ab/fw.bin"), "url", id="url-port-text"),
    pytest.param(single(url="https://[::1/fw.bin"), "url", id="url-bad-ipv6"),
    pytest.param(single(url="https://h/" + "a" * 4096), "url", id="url-too-long"),
    pytest.param(single(url=""), "url", id="url-empty"),
    pytest.param(single(url=["https://h/x"]), "url", id="url-array"),
    pytest.param(single(url="https://h.example/dir/"), "url", id="url-no-file-name"),
    pytest.param(single(url="https://h.example"), "url", id="url-no-path"),
    pytest.param(single(url="https://h.example/a/.."), "url", id="url-name-dotdot"),
    pytest.param(single(url="https://h.example/a/%2E%2E"), "url", id="url-name-dotdot-escaped"),
    pytest.param(single(url="https://h.example/a%2Fb"), "url", id="url-name-escaped-slash"),
    pytest.param(single(url="https://h.example/a%5Cb"), "url", id="url-name-backslash"),
    pytest.param(single(url="https://h.example/a%00b"), "url", id="url-name-nul"),
    pytest.param(single(url="https://h.example/a%0Ab"), "url", id="url-name-newline"),
    pytest.param(single(url="https://h.example/%FF.bin"), "url", id="url-name-not-utf8"),
    pytest.param(single(url="https://h.example/" + "a" * 256), "url", id="url-name-256"),
    # other optional fields
    pytest.param(single(module=""), "module", id="module-empty"),
    pytest.param(single(module="m" * 65), "module", id="module-65"),
    pytest.param(single(module=7), "module", id="module-int"),
    pytest.param(single(module="MCU\n"), "module", id="module-newline"),
    pytest.param(single(extData=[]), "extData", id="extdata-array"),
    pytest.param(single(extData='{"a":1}'), "extData", id="extdata-string"),
    pytest.param(single(extData=1), "extData", id="extdata-int"),
    pytest.param(single(digestsign="not base64!"), "digestsign", id="digestsign-charset"),
    pytest.param(single(digestsign="QUJD\nQUJD"), "digestsign", id="digestsign-newline"),
    pytest.param(single(digestsign="QUJD-_"), "digestsign", id="digestsign-urlsafe"),
    pytest.param(single(digestsign="QQ==QQ=="), "digestsign", id="digestsign-inner-padding"),
    pytest.param(single(digestsign="A" * 1028), "digestsign", id="digestsign-too-long"),
    pytest.param(single(digestsign=123), "digestsign", id="digestsign-int"),
    # files
    pytest.param(multi(files={"fileName": "a"}), "files", id="files-object"),
    pytest.param(multi(files="a.bin"), "files", id="files-string"),
    pytest.param(multi(files=[]), "files", id="files-empty"),
    pytest.param(multi(*[entry(f"f{i}") for i in range(MAX_FILES + 1)]), "files", id="files-21"),
    pytest.param(multi(entry(), url=SINGLE_URL), "url", id="files-with-url"),
    pytest.param(multi(entry(), size=1), "size", id="files-with-size"),
    pytest.param(multi(entry(), sign=SHA_A), "sign", id="files-with-sign"),
    pytest.param(multi(files=[entry(), []]), "files[1]", id="entry-array"),
    pytest.param(multi(files=[None]), "files[0]", id="entry-null"),
    pytest.param(multi_entry(1, fileName=DROP), "files[1].fileName", id="name-missing"),
    pytest.param(multi_entry(1, fileName=""), "files[1].fileName", id="name-empty"),
    pytest.param(multi_entry(1, fileName="a/b"), "files[1].fileName", id="name-slash"),
    pytest.param(multi_entry(1, fileName="/boot"), "files[1].fileName", id="name-absolute"),
    pytest.param(multi_entry(1, fileName="a\\b"), "files[1].fileName", id="name-backslash"),
    pytest.param(multi_entry(1, fileName="."), "files[1].fileName", id="name-dot"),
    pytest.param(multi_entry(1, fileName=".."), "files[1].fileName", id="name-dotdot"),
    pytest.param(multi_entry(1, fileName="a\x00b"), "files[1].fileName", id="name-nul"),
    pytest.param(multi_entry(1, fileName="a\nb"), "files[1].fileName", id="name-newline"),
    pytest.param(multi_entry(1, fileName="a\u202eb"), "files[1].fileName", id="name-bidi"),
    pytest.param(multi_entry(1, fileName="n" * 256), "files[1].fileName", id="name-256"),
    pytest.param(multi_entry(1, fileName=3), "files[1].fileName", id="name-int"),
    pytest.param(multi_entry(2, fileName="part0.img"), "files[2].fileName", id="name-duplicate"),
    pytest.param(multi_entry(2, fileSize=DROP), "files[2].fileSize", id="filesize-missing"),
    pytest.param(multi_entry(2, fileSize="4096"), "files[2].fileSize", id="filesize-string"),
    pytest.param(multi_entry(2, fileSize=4096.0), "files[2].fileSize", id="filesize-float"),
    pytest.param(multi_entry(2, fileSize=True), "files[2].fileSize", id="filesize-bool"),
    pytest.param(multi_entry(2, fileSize=0), "files[2].fileSize", id="filesize-zero"),
    pytest.param(multi_entry(2, fileSize=-4096), "files[2].fileSize", id="filesize-negative"),
    pytest.param(
        multi_entry(2, fileSize=MAX_FILE_SIZE + 1), "files[2].fileSize", id="filesize-huge"
    ),
    pytest.param(multi_entry(0, fileUrl=DROP), "files[0].fileUrl", id="fileurl-missing"),
    pytest.param(multi_entry(0, fileUrl="http://h/a"), "files[0].fileUrl", id="fileurl-http"),
    pytest.param(multi_entry(0, fileUrl="ftp://h/a"), "files[0].fileUrl", id="fileurl-ftp"),
    pytest.param(multi_entry(0, fileUrl="file:///a"), "files[0].fileUrl", id="fileurl-file"),
    pytest.param(multi_entry(0, fileUrl="https://h/a b"), "files[0].fileUrl", id="fileurl-space"),
    pytest.param(multi_entry(0, fileUrl=" https://h/a"), "files[0].fileUrl", id="fileurl-lead-sp"),
    pytest.param(
        multi_entry(0, fileUrl="https://h/" + LONG), "files[0].fileUrl", id="fileurl-long"
    ),
    pytest.param(multi_entry(1, fileSign=DROP), "files[1].fileSign", id="filesign-missing"),
    pytest.param(multi_entry(1, fileSign=SHA_A[:-1]), "files[1].fileSign", id="filesign-63"),
    pytest.param(multi_entry(1, fileSign=SHA_A + "a"), "files[1].fileSign", id="filesign-65"),
    pytest.param(multi_entry(1, fileSign="x" * 64), "files[1].fileSign", id="filesign-non-hex"),
    pytest.param(multi_entry(1, fileSign=MD5), "files[1].fileSign", id="filesign-md5-for-sha"),
    pytest.param(
        multi(entry("a", fileSign=DROP, fileMd5=DROP), signMethod="MD5"),
        "files[0].fileSign",
        id="md5-task-no-digest",
    ),
    pytest.param(
        multi(entry("a", fileSign=DROP, fileMd5="q" * 32), signMethod="MD5"),
        "files[0].fileMd5",
        id="filemd5-non-hex",
    ),
    pytest.param(
        multi(entry("a", fileSign=MD5, fileMd5="0" * 32), signMethod="MD5"),
        "files[0].fileMd5",
        id="filemd5-disagrees",
    ),
    # an envelope does not change the field names
    pytest.param(push(multi_entry(2, fileSize=True)), "files[2].fileSize", id="push-filesize"),
    pytest.param(get_reply(single(isDiff=1)), "isDiff", id="get-reply-isdiff"),
    pytest.param(json.dumps(push(single(url="ftp://x/y"))).encode(), "url", id="push-bytes-url"),
]


@pytest.mark.parametrize(("raw", "field"), HOSTILE)
def test_hostile_task_is_refused(raw: object, field: str) -> None:
    error = refusal(raw)
    assert error.field == field
    assert type(error) is TaskError
    assert len(str(error)) < 400  # messages quote hostile input only in part


def test_refusal_messages_are_specific() -> None:
    assert "MQTT" in str(refusal(single(dProtocol="mqtt")))
    assert "diff" in str(refusal(single(isDiff=1)))
    assert "https://, not 'http://h/x'" in str(refusal(single(url="http://h/x")))
    assert "deeper than 32" in str(refusal('{"a":' * 20_000 + "1" + "}" * 20_000))
    assert "files[1].fileName" in str(refusal(multi_entry(1, fileName="a/b")))


# --- properties ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=25,
)


@PROPERTY_SETTINGS
@given(json_values, st.sampled_from(["object", "text", "push", "get_reply"]))
def test_any_json_value_gives_a_task_or_a_task_error(value: object, form: str) -> None:
    raw: object = {
        "object": value,
        "text": json.dumps(value),  # NaN and Infinity included
        "push": push(value),
        "get_reply": get_reply(value),
    }[form]
    with contextlib.suppress(TaskError):
        assert isinstance(parse_task(raw), Task)


@PROPERTY_SETTINGS
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_any_bytes_or_text_gives_a_task_or_a_task_error(raw: bytes | str) -> None:
    with contextlib.suppress(TaskError):
        parse_task(raw)


hex_md5 = st.text("0123456789abcdef", min_size=32, max_size=32)
hex_sha256 = st.text("0123456789abcdef", min_size=64, max_size=64)
versions = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
printable_text = st.text(
    st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
    min_size=1,
    max_size=40,
).filter(str.isprintable)
file_names = printable_text.map(lambda s: s.replace("/", "_").replace("\\", "_")).filter(
    lambda s: s not in (".", "..")
)
hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True)
url_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)
urls = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}/{path}{query}",
    st.sampled_from(["https", "HTTPS", "Https"]),
    hosts,
    st.sampled_from(["", ":443", ":8443"]),
    url_text,
    st.none().map(lambda _: "") | url_text.map(lambda q: "?" + q),
)
ext_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    """A random valid Task, as parse_task would return it."""
    method: DigestMethod = "md5" if draw(st.booleans()) else "sha256"
    digests = hex_md5 if method == "md5" else hex_sha256
    names = draw(st.lists(file_names, min_size=1, max_size=MAX_FILES, unique=True))
    files = tuple(
        FileSpec(
            name=name,
            size=draw(st.integers(1, MAX_FILE_SIZE)),
            url=draw(urls),
            digest=draw(digests),
        )
        for name in names
    )
    return Task(
        version=draw(versions),
        digest_method=method,
        files=files,
        module=draw(st.none() | printable_text),
        ext_data=draw(st.dictionaries(st.text(max_size=8), ext_values, max_size=4)),
        digestsign=draw(st.none() | st.from_regex(r"[A-Za-z0-9+/]{1,64}={0,2}", fullmatch=True)),
    )


@PROPERTY_SETTINGS
@given(tasks())
def test_valid_tasks_round_trip_through_task_to_json(task: Task) -> None:
    text = json.dumps(push(task_to_json(task)))
    again = parse_task(text)
    assert again == task
    assert again.ext_data == task.ext_data
    assert again.task_id == task.task_id


@PROPERTY_SETTINGS
@given(tasks(), st.data())
def test_mutated_valid_tasks_give_a_task_or_a_task_error(task: Task, data: st.DataObject) -> None:
    """Hostile values where the parser looks: each known field replaced or dropped."""
    raw = task_to_json(task)
    files = raw["files"]
    assert isinstance(files, list)
    top_keys = ["version", "signMethod", "module", "extData", "digestsign", "files"]
    top_keys += ["url", "size", "sign", "md5", "isDiff", "dProtocol"]
    file_keys = ["fileName", "fileSize", "fileUrl", "fileSign", "fileMd5"]
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from([raw, *files]))
        keys = top_keys if target is raw else file_keys
        assert isinstance(target, dict)
        key = data.draw(st.sampled_from(keys))
        value = data.draw(st.just(DROP) | json_values | st.text(max_size=70) | st.integers())
        if value is DROP:
            target.pop(key, None)
        else:
            target[key] = value
    try:
        parse_task(json.dumps(raw))
    except TaskError as error:
        assert error.field


@PROPERTY_SETTINGS
@given(file_names, hosts, url_text)
def test_single_file_name_is_the_percent_decoded_last_segment(
    name: str, host: str, query: str
) -> None:
    url = f"https://{host}/dir/{quote(name, safe='')}?{query}"
    spec = parse_task(single(url=url)).files[0]
    assert spec.name == name
    assert spec.url == url
