"""Tests of updater.protocol: topics, uplink payload bytes, login, downlink parsing, message ids.

Expected values are written out from docs/ota-protocol.md, never computed with the code under
test: the login password in particular is rebuilt here from the protocol's description.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from updater.errors import TaskError
from updater.protocol import (
    MAX_DESC_CHARS,
    Login,
    MessageIds,
    Topics,
    get_payload,
    inform_payload,
    iot_platform_login,
    parse_downlink,
    progress_payload,
    task_module,
    topics,
)
from updater.task import Task

PK: Final = "a1B2c3D4e5F"
DN: Final = "pi-0001"
SECRET: Final = "s3cr3tS3cr3tS3cr3tS3cr3tS3cr3t12"
SHA_BOOT: Final = hashlib.sha256(b"boot").hexdigest()
SHA_ROOT: Final = hashlib.sha256(b"root").hexdigest()
TOPICS: Final = topics(PK, DN)


def decoded(payload: bytes) -> object:
    """The payload as JSON, after checking it is compact UTF-8 JSON (no space after , or :)."""
    assert isinstance(payload, bytes)
    text = payload.decode("utf-8")
    value = json.loads(text)
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value


# --- topics --------------------------------------------------------------------------------------


def test_topics_are_the_documented_strings() -> None:
    assert topics(PK, DN) == Topics(
        inform="/ota/device/inform/a1B2c3D4e5F/pi-0001",
        upgrade="/ota/device/upgrade/a1B2c3D4e5F/pi-0001",
        progress="/ota/device/progress/a1B2c3D4e5F/pi-0001",
        get="/sys/a1B2c3D4e5F/pi-0001/thing/ota/firmware/get",
        get_reply="/sys/a1B2c3D4e5F/pi-0001/thing/ota/firmware/get_reply",
    )


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a+", "#", "a b", "a\tb", "a\nb", "a\x00b", "a\x7fb", "\u00a0x", "a\ud800"],
)
def test_topics_refuse_bad_product_key_or_device_name(bad: str) -> None:
    with pytest.raises(ValueError, match="product_key"):
        topics(bad, DN)
    with pytest.raises(ValueError, match="device_name"):
        topics(PK, bad)


def test_topics_are_frozen() -> None:
    with pytest.raises(AttributeError):
        TOPICS.inform = "/elsewhere"  # type: ignore[misc]


# --- message ids ---------------------------------------------------------------------------------


def test_message_ids_start_at_one_and_increase() -> None:
    ids = MessageIds()
    assert [ids.next() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert MessageIds().next() == 1  # each instance counts on its own


def test_message_ids_are_unique_and_increasing_across_threads() -> None:
    ids = MessageIds()
    per_thread = 2000
    results: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(len(results))

    def work(out: list[int]) -> None:
        start.wait()
        out.extend(ids.next() for _ in range(per_thread))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for out in results for i in out]
    assert sorted(every) == list(range(1, len(results) * per_thread + 1))
    for out in results:  # each thread saw its own ids in increasing order
        assert out == sorted(out)
    assert ids.next() == len(results) * per_thread + 1


# --- inform --------------------------------------------------------------------------------------


def test_inform_payload_exact() -> None:
    payload = inform_payload(1, "a1b1c1")
    assert decoded(payload) == {"id": 1, "params": {"version": "a1b1c1"}}
    assert payload == b'{"id":1,"params":{"version":"a1b1c1"}}'


def test_inform_payload_with_module() -> None:
    payload = inform_payload(7, "1.2.3", module="MCU")
    assert decoded(payload) == {"id": 7, "params": {"version": "1.2.3", "module": "MCU"}}
    assert payload == b'{"id":7,"params":{"version":"1.2.3","module":"MCU"}}'


@pytest.mark.parametrize("module", [None, "default"])
def test_inform_payload_omits_the_default_module(module: str | None) -> None:
    assert decoded(inform_payload(2, "v2", module=module)) == {"id": 2, "params": {"version": "v2"}}


@pytest.mark.parametrize(
    ("msg_id", "version", "module"),
    [(1, "", None), (-1, "v", None), (True, "v", None), (1, "v", ""), (1, "v", "a\nb")],
)
def test_inform_payload_refuses_bad_arguments(
    msg_id: int, version: str, module: str | None
) -> None:
    with pytest.raises(ValueError):
        inform_payload(msg_id, version, module=module)


# --- progress ------------------------------------------------------------------------------------


def test_progress_payload_exact() -> None:
    payload = progress_payload(3, 45)
    assert decoded(payload) == {"id": 3, "params": {"step": "45", "desc": ""}}
    assert payload == b'{"id":3,"params":{"step":"45","desc":""}}'


def test_progress_payload_with_desc_and_module() -> None:
    payload = progress_payload(4, -3, "boot.img: SHA256 mismatch", module="MCU")
    expected = {"step": "-3", "desc": "boot.img: SHA256 mismatch", "module": "MCU"}
    assert decoded(payload) == {"id": 4, "params": expected}
    assert payload == (
        b'{"id":4,"params":{"step":"-3","desc":"boot.img: SHA256 mismatch","module":"MCU"}}'
    )


@pytest.mark.parametrize("step", [-4, -3, -2, -1, 0, 1, 5, 99, 100])
def test_progress_step_is_a_json_string_of_the_signed_integer(step: int) -> None:
    params = decoded(progress_payload(1, step))
    assert isinstance(params, dict)
    assert params["params"]["step"] == str(step)
    assert isinstance(params["params"]["step"], str)


@pytest.mark.parametrize("step", [-5, -100, 101, 1000])
def test_progress_refuses_undefined_steps(step: int) -> None:
    with pytest.raises(ValueError, match="step"):
        progress_payload(1, step)


@pytest.mark.parametrize("step", [True, 50.0, "50"])
def test_progress_refuses_non_integer_steps(step: object) -> None:
    with pytest.raises(ValueError, match="step"):
        progress_payload(1, step)  # type: ignore[arg-type]


@pytest.mark.parametrize("module", [None, "default"])
def test_progress_payload_omits_the_default_module(module: str | None) -> None:
    assert decoded(progress_payload(1, 0, module=module)) == {
        "id": 1,
        "params": {"step": "0", "desc": ""},
    }


def test_progress_desc_is_truncated_with_an_ellipsis() -> None:
    exact = "x" * MAX_DESC_CHARS
    assert _desc_of(progress_payload(1, -1, exact)) == exact
    long = "y" * (MAX_DESC_CHARS + 1)
    desc = _desc_of(progress_payload(1, -1, long))
    assert len(desc) == MAX_DESC_CHARS
    assert desc == "y" * (MAX_DESC_CHARS - 1) + "\u2026"


def test_progress_desc_is_utf8_and_survives_surrogates() -> None:
    payload = progress_payload(1, -4, "写入失败 fw\udcff.bin")
    assert "写入失败".encode() in payload  # UTF-8, not \\u escapes
    assert _desc_of(payload) == "写入失败 fw\ufffd.bin"


@given(st.text(max_size=2000), st.integers(-4, 100))
def test_progress_payload_is_valid_json_for_any_desc(desc: str, step: int) -> None:
    text = _desc_of(progress_payload(1, step, desc))
    assert len(text) <= MAX_DESC_CHARS
    if len(desc) <= MAX_DESC_CHARS and not any("\ud800" <= c <= "\udfff" for c in desc):
        assert text == desc


def _desc_of(payload: bytes) -> str:
    message = decoded(payload)
    assert isinstance(message, dict)
    desc = message["params"]["desc"]
    assert isinstance(desc, str)
    return desc


# --- firmware get --------------------------------------------------------------------------------


def test_get_payload_exact() -> None:
    payload = get_payload(5)
    assert decoded(payload) == {
        "id": 5,
        "version": "1.0",
        "params": {},
        "method": "thing.ota.firmware.get",
    }
    assert payload == b'{"id":5,"version":"1.0","params":{},"method":"thing.ota.firmware.get"}'


def test_get_payload_with_module() -> None:
    assert decoded(get_payload(6, module="MCU")) == {
        "id": 6,
        "version": "1.0",
        "params": {"module": "MCU"},
        "method": "thing.ota.firmware.get",
    }
    assert decoded(get_payload(6, module="default")) == decoded(get_payload(6))


# --- login ---------------------------------------------------------------------------------------


def test_login_for_a_fixed_device() -> None:
    ts = "2524608000000"
    # The signed pairs, concatenated in key order, as the protocol describes them.
    pairs = {"timestamp": ts, "productKey": PK, "deviceName": DN, "clientId": f"{PK}.{DN}"}
    plain = "".join(f"{key}{pairs[key]}" for key in sorted(pairs))
    assert plain == (
        "clientIda1B2c3D4e5F.pi-0001deviceNamepi-0001productKeya1B2c3D4e5Ftimestamp2524608000000"
    )
    expected_password = hmac.new(SECRET.encode(), plain.encode(), hashlib.sha256).hexdigest()
    # The same value from another implementation (`openssl dgst -sha256 -hmac`), pinned.
    assert expected_password == "542a3acff2d052e0fb7ae09e1b36cdca5a89b162966825efa8d8a39d8f0b737f"

    login = iot_platform_login(PK, DN, SECRET)

    assert login.client_id == (
        "a1B2c3D4e5F.pi-0001|timestamp=2524608000000,_ss=1,_v=rpi-ab-updater,"
        "securemode=2,signmethod=hmacsha256|"
    )
    assert login.username == "pi-0001&a1B2c3D4e5F"
    assert login.password == expected_password
    assert len(login.password) == 64
    assert login.password == login.password.lower()


def test_login_options_change_the_client_id_and_the_signature() -> None:
    default = iot_platform_login(PK, DN, SECRET)
    plain_tcp = iot_platform_login(PK, DN, SECRET, securemode=3, agent="fleet-7/1.0")
    assert plain_tcp.client_id == (
        "a1B2c3D4e5F.pi-0001|timestamp=2524608000000,_ss=1,_v=fleet-7/1.0,"
        "securemode=3,signmethod=hmacsha256|"
    )
    assert plain_tcp.password == default.password  # securemode and _v are not signed

    other_ts = iot_platform_login(PK, DN, SECRET, timestamp="1700000000000")
    assert "timestamp=1700000000000," in other_ts.client_id
    plain = f"clientId{PK}.{DN}deviceName{DN}productKey{PK}timestamp1700000000000"
    assert other_ts.password == hmac.new(SECRET.encode(), plain.encode(), "sha256").hexdigest()

    assert iot_platform_login(PK, DN, SECRET + "x").password != default.password


def test_login_repr_hides_the_password() -> None:
    login = iot_platform_login(PK, DN, SECRET)
    for text in (repr(login), str(login), f"{login}"):
        assert login.password not in text
        assert SECRET not in text
        assert "password" not in text
    assert login.client_id in repr(login)
    assert Login("c", "u", "hunter2") == Login("c", "u", "hunter2")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"product_key": ""},
        {"product_key": "a1B2/c3"},
        {"device_name": "pi 1"},
        {"device_name": "pi&1"},
        {"device_name": "pi|1"},
        {"device_name": "pi,1"},
        {"device_name": "pi=1"},
        {"device_secret": ""},
        {"timestamp": ""},
        {"timestamp": "12a"},
        {"timestamp": "\u0661\u0662"},  # Arabic-Indic digits: isdigit, not ASCII
        {"securemode": 1},
        {"securemode": True},
        {"agent": ""},
        {"agent": "a b"},
        {"agent": "a,b"},
        {"agent": "a|b"},
    ],
)
def test_login_refuses_values_that_break_the_client_id(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"product_key": PK, "device_name": DN, "device_secret": SECRET}
    args.update(kwargs)
    with pytest.raises(ValueError):
        iot_platform_login(**args)  # type: ignore[arg-type]


# --- downlink ------------------------------------------------------------------------------------


def multi_data(module: str | None = None) -> dict[str, object]:
    data: dict[str, object] = {
        "version": "a1b1",
        "signMethod": "SHA256",
        "files": [
            {
                "fileName": "boot.img",
                "fileSize": 4096,
                "fileUrl": "https://oss.example.com/pkg/boot.img?Signature=x%2By&Expires=1",
                "fileSign": SHA_BOOT,
            },
            {
                "fileName": "root.img",
                "fileSize": 8192,
                "fileUrl": "https://oss.example.com/pkg/root.img?Signature=x%2By&Expires=1",
                "fileSign": SHA_ROOT,
            },
        ],
    }
    if module is not None:
        data["module"] = module
    return data


def push(data: object) -> bytes:
    envelope = {"code": "1000", "data": data, "id": 1626969597472, "message": "success"}
    return json.dumps(envelope).encode()


def get_reply(data: object) -> bytes:
    return json.dumps({"id": "123", "code": 200, "data": data}).encode()


def test_parse_downlink_push() -> None:
    task = parse_downlink(TOPICS, TOPICS.upgrade, push(multi_data(module="MCU")))
    assert isinstance(task, Task)
    assert task.version == "a1b1"
    assert [f.name for f in task.files] == ["boot.img", "root.img"]
    assert [f.digest for f in task.files] == [SHA_BOOT, SHA_ROOT]
    assert task.module == "MCU"
    assert task_module(task) == "MCU"


def test_parse_downlink_accepts_a_bytearray_payload() -> None:
    task = parse_downlink(TOPICS, TOPICS.upgrade, bytearray(push(multi_data())))
    assert task is not None
    assert task.version == "a1b1"


def test_parse_downlink_get_reply_with_data() -> None:
    task = parse_downlink(TOPICS, TOPICS.get_reply, get_reply(multi_data()))
    assert isinstance(task, Task)
    assert task.version == "a1b1"
    assert task.total_size == 4096 + 8192
    assert task_module(task) is None


@pytest.mark.parametrize(
    ("topic", "message"),
    [(TOPICS.get_reply, get_reply({})), (TOPICS.upgrade, push({}))],
    ids=["get_reply", "push"],
)
def test_parse_downlink_nothing_pending(topic: str, message: bytes) -> None:
    """``data: {}`` is no task; the protocol treats the two envelopes' ``data`` alike."""
    assert parse_downlink(TOPICS, topic, message) is None


@pytest.mark.parametrize(
    "payload",
    [b"", b"{not json", b"[]", push([]), get_reply({"version": "v1"}), b"\xff\xfe"],
)
def test_parse_downlink_malformed_raises_task_error(payload: bytes) -> None:
    with pytest.raises(TaskError):
        parse_downlink(TOPICS, TOPICS.upgrade, payload)
    with pytest.raises(TaskError):
        parse_downlink(TOPICS, TOPICS.get_reply, payload)


@pytest.mark.parametrize(
    "topic",
    [
        TOPICS.inform,
        TOPICS.progress,
        TOPICS.get,
        "/ota/device/upgrade/a1B2c3D4e5F/pi-0002",
        "/ota/device/upgrade/a1B2c3D4e5F/PI-0001",
        "/ota/device/upgrade/a1B2c3D4e5F/pi-0001/",
        "",
    ],
)
def test_parse_downlink_wrong_topic(topic: str) -> None:
    with pytest.raises(ValueError, match="topic") as caught:
        parse_downlink(TOPICS, topic, push(multi_data()))
    assert not isinstance(caught.value, TaskError)


@pytest.mark.parametrize(("module", "expected"), [(None, None), ("default", None), ("MCU", "MCU")])
def test_task_module(module: str | None, expected: str | None) -> None:
    task = parse_downlink(TOPICS, TOPICS.upgrade, push(multi_data(module=module)))
    assert task is not None
    assert task.module == module  # the task keeps what the push said
    assert task_module(task) == expected
    # and the payload builders agree with it
    params: dict[str, str] = {"version": "a1b1"}
    if expected is not None:
        params["module"] = expected
    assert decoded(inform_payload(1, "a1b1", task_module(task))) == {"id": 1, "params": params}
