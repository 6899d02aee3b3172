"""The project's one exception tree.

Every error the updater raises on purpose is an :class:`UpdaterError`. Each branch knows the IoT
Platform progress code it is reported with (``step``: -1 update failed, -2 download failed,
-3 verification failed, -4 writing failed) and the exit code of ``rpi-updater install``; only the
CLI turns an error into an exit code, and only the agent turns it into a progress message.
Context is added by chaining (``raise ... from err``), never by parsing messages.

::

    UpdaterError                  step -1, exit 1   anything else that went wrong
    ├── InvalidInput              step -1, exit 2   nothing was written
    │   ├── TaskError             .field            a malformed or hostile task
    │   ├── ConfigError           .path, .key       a bad configuration file
    │   └── PlanError             .file_name        the task does not fit this device
    ├── DownloadError             step -2, exit 3   .url, .offset, .file_name
    │   ├── TransientDownloadError                  worth another attempt (cut, stall, 5xx)
    │   └── RemoteChangedError                      the file changed on the server mid-transfer
    ├── VerificationError         step -3, exit 4   .file_name (digest or size mismatch)
    │   └── ManifestError                           unsigned, badly signed, or not what was signed
    ├── WriteError                step -4, exit 5   .file_name, .target (I/O on the target)
    │   └── HookError             .hook             a hook refused, failed or timed out
    └── StateError                step -1, exit 1   the state directory or journal is unusable

    Cancelled (a BaseException, like KeyboardInterrupt): the install was stopped on purpose (a
    newer task replaces it); the journal stays resumable and nothing is reported as failed.
"""

from __future__ import annotations


class UpdaterError(Exception):
    """Base of every error the updater raises on purpose."""

    step: int = -1
    exit_code: int = 1

    def __init__(self, message: str, *, file_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file_name = file_name

    @property
    def desc(self) -> str:
        """The reason as the platform hears it (``desc`` of a negative progress step)."""
        if self.file_name and self.file_name not in self.message:
            return f"{self.file_name}: {self.message}"
        return self.message

    def __str__(self) -> str:
        return self.desc


class InvalidInput(UpdaterError):
    """The input was refused before anything was written."""

    exit_code = 2


class TaskError(InvalidInput):
    """A task (push payload or task file) is malformed or hostile; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"task field {field!r}: {message}")
        self.field = field


class ConfigError(InvalidInput):
    """A configuration file is unusable; ``path`` and ``key`` say where."""

    def __init__(self, path: str, key: str, message: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.key = key


class PlanError(InvalidInput):
    """The task does not fit this device (no target, too large, would touch the booted slot)."""


class DownloadError(UpdaterError):
    """A file could not be fetched."""

    step = -2
    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        url: str = "",
        offset: int = 0,
        file_name: str | None = None,
    ) -> None:
        super().__init__(message, file_name=file_name)
        self.url = url
        self.offset = offset


class TransientDownloadError(DownloadError):
    """A failure that another attempt may cure: a cut, a stall, a reset, a 5xx.

    ``retry_after`` carries the server's Retry-After (seconds) when it sent one.
    """

    retry_after: float | None = None


class RemoteChangedError(DownloadError):
    """The file changed on the server during the transfer (validator mismatch)."""


class VerificationError(UpdaterError):
    """What arrived is not what the task (or manifest) promised."""

    step = -3
    exit_code = 4


class ManifestError(VerificationError):
    """The manifest, its envelope, a key or the keyring is unusable, or the package does not
    match what the manifest promises. Raised before anything is written (step -3, exit 4)."""


class WriteError(UpdaterError):
    """Writing to a target failed."""

    step = -4
    exit_code = 5

    def __init__(
        self, message: str, *, file_name: str | None = None, target: str | None = None
    ) -> None:
        super().__init__(message, file_name=file_name)
        self.target = target


class HookError(WriteError):
    """A hook program was refused (ownership, mode), failed, or timed out."""

    def __init__(
        self,
        message: str,
        *,
        hook: str,
        file_name: str | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__(message, file_name=file_name, target=target)
        self.hook = hook


class StateError(UpdaterError):
    """The state directory or the journal cannot be used."""


class Cancelled(BaseException):
    """The running install was stopped on purpose (a newer task replaces it)."""
