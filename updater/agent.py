"""``rpi-updater daemon``: the device's MQTT agent on the IoT Platform OTA protocol.

Intake apart from install (SWUpdate's suricatta): this module turns messages into validated
tasks and publishes what the platform must hear; the install itself is the same
:class:`~updater.flow.Flow` that ``rpi-updater install`` runs, on a worker thread.

- On every connect: subscribe to the push and get_reply topics, inform the current version,
  ask for a pending update (firmware/get).
- A push or a get_reply with data becomes a Task. Rules: a task already running, already armed,
  or already committed is not run again (MQTT redelivers; the platform re-sends); a *new* task
  while another is still downloading replaces it (the old one is cancelled and rolled back; of
  several waiting, the newest wins); a new task while an update is being applied or waits for
  its reboot or its health check is refused, and said so in the log only (the platform's
  progress topic has no task id to answer it on). Tasks for another module are ignored.
- What the platform must hear goes through an outbox kept on disk: the latest inform and the
  latest progress (a newer progress supersedes an older one), resent after a broker outage or a
  restart until the broker acknowledged them.
- A failure the health check recorded after a reboot (or before a restart) is reported once as
  the negative progress step with its reason; a committed update is reported by the inform.
- systemd: READY=1 once initialised (a device that boots offline must still start, and resume
  its download), STATUS= says what happens, WATCHDOG=1 only while paho's thread and the worker
  are alive and an install, if one runs, shows signs of life.
- Bad input never stops the daemon: malformed messages are logged and ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from updater.config import Config
from updater.errors import Cancelled, ConfigError, TaskError, UpdaterError, VerificationError
from updater.identity import load_identity
from updater.journal import StateLock, atomic_write_json, read_json
from updater.logctx import clear_context, set_context
from updater.machine import Record, State, StateStore
from updater.progress import StepReporter
from updater.protocol import (
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

log = logging.getLogger("updater.agent")

TICK = 0.25  # seconds between main-loop rounds: also the progress rate limit (4 messages/s)


# -- the outbox --------------------------------------------------------------------------------


@dataclass(slots=True)
class Pending:
    topic: str
    payload: bytes
    mid: int | None = None  # set while the broker's acknowledgement is awaited


class Outbox:
    """The reports the platform has not acknowledged yet, one per kind, kept on disk.

    Kinds: "inform" and "progress"; a newer message of a kind supersedes the older, so after a
    long outage the platform hears the latest state, not a backlog.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.items: dict[str, Pending] = {}
        self._early_acks: set[int] = set()  # acknowledged before publish() returned its mid
        try:
            data = read_json(path)
        except UpdaterError as err:  # a damaged outbox must not keep the daemon down
            log.warning("outbox dropped: %s", err.desc)
            data = None
        if isinstance(data, dict):
            for kind, item in data.items():
                if isinstance(item, dict) and isinstance(item.get("topic"), str):
                    payload = item.get("payload")
                    if isinstance(payload, str):
                        self.items[kind] = Pending(item["topic"], payload.encode())

    def put(self, kind: str, topic: str, payload: bytes) -> None:
        with self._lock:
            self.items[kind] = Pending(topic, payload)
            self._save()

    def sent(self, mid: int) -> None:
        """The broker acknowledged message ``mid``: forget it, unless superseded meanwhile."""
        with self._lock:
            for kind, item in list(self.items.items()):
                if item.mid == mid:
                    del self.items[kind]
                    self._save()
                    return
            self._early_acks.add(mid)

    def published(self, kind: str, item: Pending, mid: int) -> None:
        """``item`` went out as ``mid`` (its acknowledgement may already have come)."""
        with self._lock:
            if mid in self._early_acks:
                self._early_acks.discard(mid)
                if self.items.get(kind) is item:
                    del self.items[kind]
                    self._save()
                return
            item.mid = mid

    def unsent(self) -> list[tuple[str, Pending]]:
        with self._lock:
            return [(k, v) for k, v in self.items.items() if v.mid is None]

    def reset_mids(self) -> None:
        """After a disconnect nothing in flight counts as sent: everything goes again."""
        with self._lock:
            self._early_acks.clear()
            for item in self.items.values():
                item.mid = None

    def _save(self) -> None:
        data = {k: {"topic": v.topic, "payload": v.payload.decode()} for k, v in self.items.items()}
        atomic_write_json(self.path, data)


# -- paho, 1.6 and 2.x alike ---------------------------------------------------------------------


def _client(client_id: str) -> mqtt.Client:
    try:
        from paho.mqtt.enums import CallbackAPIVersion
    except ImportError:  # paho-mqtt 1.6 (Debian 12)
        return mqtt.Client(client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311)
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )


def _failed(code: object) -> bool:
    """paho 2 passes a ReasonCode, paho 1.6 an int."""
    is_failure = getattr(code, "is_failure", None)
    return bool(is_failure) if is_failure is not None else code != 0


def _refused(codes: object) -> bool:
    """Whether a SUBACK refused any topic: paho 2 passes a list of ReasonCodes, paho 1.6 a tuple
    of granted QoS ints (0x80 is the refusal). (The system test found a paho 1.6 SUBACK of
    ``(1, 1)`` taken for a refusal: Debian 12's python3-paho-mqtt is 1.6.)"""
    results = list(codes) if isinstance(codes, list | tuple) else [codes]
    return any(c >= 0x80 if isinstance(c, int) else _failed(c) for c in results)


# -- the agent -----------------------------------------------------------------------------------


class Agent:
    def __init__(self, config: Config, config_path: str) -> None:
        mqtt = config.mqtt
        if not mqtt.host:
            raise ConfigError(config_path, "mqtt.host", "missing: the daemon needs a broker")
        self.config = config
        self.identity = load_identity(mqtt.identity_file, mqtt.login)
        self.topics: Topics = topics(self.identity.product_key, self.identity.device_name)
        self.module = mqtt.module
        self.ids = MessageIds()
        state_dir = Path(config.state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.outbox = Outbox(state_dir / "outbox.json")
        self.store = StateStore(state_dir)
        self.stop = threading.Event()
        self.cancel = threading.Event()
        self.connected = threading.Event()
        self.running: Task | None = None
        self.next_task: Task | None = None  # one slot: the newest task wins
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._report_due = threading.Event()  # inform and report the last result (main loop)
        self._state_mtime = 0.0
        self._last_publish = 0.0
        self._last_alive = time.monotonic()
        self._status = ""
        self._notifier = _Notifier()
        self.client = self._make_client()

    # -- connection ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        ident, mqtt = self.identity, self.config.mqtt
        if mqtt.login == "iot-platform":
            assert ident.device_secret is not None
            login = iot_platform_login(ident.product_key, ident.device_name, ident.device_secret)
            client = _client(login.client_id)
            client.username_pw_set(login.username, login.password)
        else:
            client = _client(ident.client_id or f"{ident.product_key}.{ident.device_name}")
            if ident.username:
                client.username_pw_set(ident.username, ident.password)
        context = ssl.create_default_context(cafile=mqtt.ca_file)  # verified, hostname checked
        if ident.client_cert and ident.client_key:
            context.load_cert_chain(ident.client_cert, ident.client_key)
        client.tls_set_context(context)
        client.reconnect_delay_set(min_delay=1, max_delay=int(mqtt.reconnect_max))
        # A callback that raises must not end paho's network thread (paho does not catch).
        client.suppress_exceptions = True
        client.on_socket_open = _no_delay  # a QoS 1 round trip costs 40 ms with Nagle on
        client.on_connect = _guarded(self._on_connect)
        client.on_connect_fail = _guarded(self._on_connect_fail)
        client.on_disconnect = _guarded(self._on_disconnect)
        client.on_message = _guarded(self._on_message)
        client.on_publish = _guarded(self._on_publish)
        client.on_subscribe = _guarded(self._on_subscribe)
        return client

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, code: object, *_: object
    ) -> None:
        if _failed(code):
            log.error("the broker refused the connection: %s", code)
            return
        log.info("connected to %s:%d", self.config.mqtt.host, self.config.mqtt.port)
        # paho would resend what was unacknowledged before the outage, stale steps included;
        # the outbox holds the latest of each kind and is the only source of resends.
        with client._out_message_mutex:
            client._out_messages.clear()
        self.outbox.reset_mids()
        client.subscribe([(self.topics.upgrade, 1), (self.topics.get_reply, 1)])
        self.connected.set()
        self._report_due.set()  # the main loop informs, reports, flushes and asks (firmware/get)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object, *_: object) -> None:
        log.warning(
            "cannot connect to %s:%d; retrying", self.config.mqtt.host, self.config.mqtt.port
        )

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, codes: object, *_: object
    ) -> None:
        if _refused(codes):
            log.error("the broker refused a subscription (check its ACL): %s", codes)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, *args: object) -> None:
        self.connected.clear()
        self.outbox.reset_mids()
        if not self.stop.is_set():
            log.warning("disconnected from the broker; reconnecting")

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, *_: object) -> None:
        self.outbox.sent(mid)

    # -- what the platform hears -----------------------------------------------------------------

    def _report_current_version(self) -> None:
        version = _combined(self.config, self.store.load())
        if version:
            payload = inform_payload(self.ids.next(), version, self.module)
            self.outbox.put("inform", self.topics.inform, payload)

    def _report_last_failure(self) -> bool:
        """A failure recorded by the health check (or before a restart), reported once.
        Returns False when the state is busy (try again later)."""
        try:
            with StateLock(Path(self.config.state_dir)):
                record = self.store.load()
                last = record.last_result
                if not last or last.get("reported") or last.get("result") == "committed":
                    return True
                step = int(last.get("step") or -1)
                self._progress(step if step < 0 else -1, str(last.get("reason") or "failed"))
                last["reported"] = True
                self.store.save(record)
        except UpdaterError as err:  # another process or the worker holds it
            log.debug("last result not reported now: %s", err.desc)
            return False
        return True

    def _progress(self, step: int, desc: str, module: str | None = None) -> None:
        payload = progress_payload(self.ids.next(), step, desc, module or self.module)
        self.outbox.put("progress", self.topics.progress, payload)
        if step < 0 or step in (0, 100):
            self._flush()  # the ends are sent at once; the steps in between at the tick's pace

    def _flush(self) -> None:
        if not self.connected.is_set():
            return
        with self._flush_lock:  # one publisher at a time: mids stay paired with their items
            for kind, item in self.outbox.unsent():
                info = self.client.publish(item.topic, item.payload, qos=1)
                self.outbox.published(kind, item, info.mid)
            self._last_publish = time.monotonic()

    # -- incoming --------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            task = parse_downlink(self.topics, message.topic, bytes(message.payload))
        except TaskError as err:
            log.warning("ignored a malformed message on %s: %s", message.topic, err.desc)
            busy = self.running is not None or self.store.load().state != State.IDLE
            if message.topic == self.topics.upgrade and not busy:
                # Answered only when idle: the progress topic has no task id, and an update
                # under way would take the blame.
                self._progress(-1, f"malformed task: {err.desc}")
            return
        except (ValueError, UnicodeDecodeError) as err:
            log.warning("ignored a message on %s: %s", message.topic, err)
            return
        if task is None:
            log.info("no update pending")
            return
        if task_module(task) != (self.module if self.module != "default" else None):
            log.info("ignored task %s for module %s", task.task_id, task.module)
            return
        self._accept(task)

    def _accept(self, task: Task) -> None:
        """The rules for a task that arrives (see the module docstring)."""
        with self._lock:
            record = self.store.load()
            if self.running is not None and self.running.task_id == task.task_id:
                log.info("task %s is already being installed", task.task_id)
                return
            if self.next_task is not None and self.next_task.task_id == task.task_id:
                self.next_task = task  # a fresher copy (presigned URLs expire)
                return
            last = record.last_result
            if last.get("task_id") == task.task_id and last.get("result") == "committed":
                log.info("task %s is already installed; informing the version again", task.task_id)
                self._report_due.set()
                return
            if record.state in (State.ARMED, State.VERIFY_REBOOT, State.COMMIT, State.INSTALL):
                log.warning(
                    "task %s refused: version %s is %s",
                    task.task_id,
                    record.version,
                    "being applied" if record.state == State.INSTALL else "waiting for its reboot",
                )
                return
            if self.running is not None:
                log.warning("task %s replaces task %s", task.task_id, self.running.task_id)
                self.cancel.set()
            self.next_task = task
            self._wake.set()

    # -- the worker: installs, one at a time -------------------------------------------------

    def _take(self) -> Task | None:
        while not self.stop.is_set():
            self._wake.wait(1.0)
            with self._lock:
                task, self.next_task = self.next_task, None
                self._wake.clear()
                if task is not None:
                    self.cancel.clear()
                    self.running = task
                    return task
        return None

    def _worker(self) -> None:
        while True:
            task = self._take()
            if task is None:
                return
            self._last_alive = time.monotonic()
            set_context(task=task.task_id, version=task.version)
            try:
                self._install(task)
            except Cancelled:
                log.info("task %s stopped: a newer task replaces it", task.task_id)
            except Exception:  # never let a bug stop the worker
                log.exception("task %s: unexpected error", task.task_id)
            finally:
                clear_context()
                with self._lock:
                    self.running = None
                    if self.next_task is None:
                        self._requeue_unfinished()

    def _install(self, task: Task) -> None:
        from updater.flow import BusyError, Flow

        self._set_status(f"installing version {task.version}")
        negative = threading.Event()

        def publish(step: int, desc: str) -> None:
            if step < 0:
                negative.set()
            self._last_alive = time.monotonic()
            self._progress(step, desc, task_module(task))

        reporter = StepReporter(self.config.mqtt.progress_step, publish=publish)
        try:
            # What can be refused, before the lock; a newer task stops a slow manifest fetch.
            plan = Flow(self.config, cancel=self.cancel).prepare(task)
            set_context(task=task.task_id, version=task.version, slot=plan.slot)
            with StateLock(Path(self.config.state_dir)):
                flow = Flow(self.config, progress_sinks=[reporter], cancel=self.cancel)
                record = flow.install(task, plan)
                last = record.last_result
                if record.state == State.IDLE and last.get("task_id") == task.task_id:
                    if last.get("result") != "committed" and not negative.is_set():
                        # failed after 100 % (a hook, the bootloader): say so now
                        publish(int(last.get("step") or -1), str(last.get("reason") or "failed"))
                    last["reported"] = True
                    flow.store.save(record)
        except BusyError as err:  # not this task's failure: only logged
            log.warning("task %s refused: %s", task.task_id, err.desc)
            return
        except UpdaterError as err:  # refused before the first byte
            log.error("task %s refused: %s", task.task_id, err.desc)
            publish(err.step, err.desc)
            if isinstance(err, VerificationError) and Flow(self.config).under_way(task):
                with StateLock(Path(self.config.state_dir)):
                    Flow(self.config).abandon(task)
            return
        if record.state == State.ARMED:
            self._set_status(f"version {task.version} installed; reboot pending")
        else:
            self._report_due.set()
            self._set_status("idle")

    def _requeue_unfinished(self) -> None:
        """An update left in Download/Install with nothing running (a restart, a cancelled
        replacement that was refused) is resumed. Called with ``_lock`` held."""
        try:
            record = self.store.load()
        except UpdaterError as err:
            log.error("cannot read the state: %s", err.desc)
            return
        if record.state in (State.DOWNLOAD, State.INSTALL) and record.task is not None:
            from updater.task import parse_task

            try:
                task = parse_task(record.task)
            except TaskError as err:
                log.error("the unfinished task cannot be resumed: %s", err.desc)
                return
            log.info("resuming task %s (%s)", record.task_id, record.state)
            self.next_task = task
            self._wake.set()

    # -- the main loop -----------------------------------------------------------------------------

    def _set_status(self, text: str) -> None:
        self._status = text
        self._notifier.notify(f"STATUS={text}")

    def _state_changed(self) -> bool:
        """state.json was written by someone (the health check at boot, an operator)."""
        try:
            mtime = self.store.path.stat().st_mtime
        except FileNotFoundError:
            mtime = 0.0
        changed, self._state_mtime = mtime != self._state_mtime, mtime
        return changed

    def _healthy(self, worker: threading.Thread) -> bool:
        """Whether to pet systemd's watchdog: every thread alive, and an install, if one runs,
        has shown a sign of life within the longest legitimate pause (a hook, a back-off)."""
        loop = getattr(self.client, "_thread", None)
        if not worker.is_alive() or (loop is not None and not loop.is_alive()):
            return False
        if self.running is None:
            return True
        dl = self.config.download
        bound = max(self.config.hooks.timeout, dl.backoff_max, dl.low_speed_time) + 120
        return time.monotonic() - self._last_alive < bound

    def run(self) -> int:
        with self._lock:
            self._requeue_unfinished()  # before any push can arrive
        worker = threading.Thread(target=self._worker, name="installer", daemon=True)
        worker.start()
        settings = self.config.mqtt
        assert settings.host is not None
        self.client.connect_async(settings.host, settings.port, keepalive=settings.keepalive)
        self.client.loop_start()
        self._notifier.notify("READY=1")  # initialised; the connection comes when it can
        self._set_status("connecting")
        watchdog = _watchdog_interval()
        last_ping = 0.0
        asked = False
        try:
            while not self.stop.is_set():
                self.stop.wait(TICK)
                if self._state_changed() and self.running is None:
                    self._report_due.set()
                if self.connected.is_set() and self._report_due.is_set():
                    self._report_due.clear()
                    self._report_current_version()
                    if not self._report_last_failure():
                        self._report_due.set()  # busy: again at the next tick
                    self._flush()
                    if not asked:  # once per connection: is an update pending?
                        payload = get_payload(self.ids.next(), self.module)
                        self.client.publish(self.topics.get, payload, qos=1)
                    asked = True
                    if self.running is None:
                        self._set_status("connected; idle")
                if not self.connected.is_set():
                    asked = False
                if self.connected.is_set() and time.monotonic() - self._last_publish >= TICK:
                    self._flush()
                now = time.monotonic()
                if now - last_ping >= watchdog and self._healthy(worker):
                    self._notifier.notify("WATCHDOG=1")
                    last_ping = now
        finally:
            self._notifier.notify("STOPPING=1")
            self.cancel.set()
            self._wake.set()
            worker.join(timeout=30)
            self.client.loop_stop()
            self.client.disconnect()
        return 0

    def request_stop(self, *_: object) -> None:
        self.stop.set()


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that logs its exceptions instead of letting them end paho's thread."""

    def run(*args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("error in %s", callback.__name__)

    return run


def _combined(config: Config, record: Record) -> str:
    from updater.versions import combined_version

    combined = combined_version(config, {**config.factory_versions, **record.installed})
    return combined or str(record.last_result.get("package_version") or "")


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    import socket

    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _watchdog_interval() -> float:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), or 10 s when there is none."""
    try:
        return max(1.0, int(os.environ["WATCHDOG_USEC"]) / 2e6)
    except (KeyError, ValueError):
        return 10.0


class _Notifier:
    """sdnotify, harmless when not run by systemd."""

    def __init__(self) -> None:
        self._notify: Callable[[str], object] | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._notify = sdnotify.SystemdNotifier().notify

    def notify(self, message: str) -> None:
        if self._notify is not None:
            self._notify(message)


def run_daemon(config: Config, config_path: str) -> int:
    agent = Agent(config, config_path)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    log.info(
        "rpi-updater daemon for %s/%s on %s:%d",
        agent.identity.product_key,
        agent.identity.device_name,
        config.mqtt.host,
        config.mqtt.port,
    )
    return agent.run()


__all__ = ["Agent", "Outbox", "run_daemon"]
