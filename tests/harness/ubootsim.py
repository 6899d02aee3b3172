"""U-Boot's part of a reboot, for tests: run the shipped ``boot.cmd`` over a real env file.

:class:`UBootSim` does what U-Boot does at power-on, minus the hardware: load the environment
(with the real ``fw_printenv``, from the same fw_env.config the updater uses; on a bad CRC,
U-Boot's built-in default), add what the board code sets (``fdt_addr``), then **interpret
image-recipes/uboot/boot.cmd itself**: ``saveenv`` writes with the real ``fw_setenv``, ``booti``
ends the boot. There is no second copy of the A/B logic to drift from the script: a change to
boot.cmd changes what these tests see, and a command the interpreter does not know fails loudly.

The interpreter covers the hush subset boot.cmd uses, with U-Boot's semantics where they differ
from a POSIX shell: ``test`` is ported from ``cmd/test.c`` (fewer than 3 arguments is false,
numbers by ``simple_strtol(s, NULL, 0)``), ``setexpr`` reads and writes hex, ``setenv`` with an
empty value deletes. Not covered: ``&&``/``||``, pipes, loops, ``run``, hush locals.

:func:`make_env` writes a fresh environment (CRC32 little-endian + ``name=value`` NUL-separated,
double NUL, padded; with redundant copies a flags byte after the CRC) and its fw_env.config.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BOOT_CMD",
    "BUILTIN_ENV",
    "ENV_SIZE",
    "IMAGE_ENV",
    "Boot",
    "SimError",
    "UBootSim",
    "commands",
    "env_image",
    "make_env",
    "parse_script",
    "printenv",
    "simple_strtol",
    "u_boot_test",
]

BOOT_CMD = Path(__file__).resolve().parents[2] / "image-recipes" / "uboot" / "boot.cmd"
ENV_SIZE = 0x4000  # CONFIG_ENV_SIZE of the Raspberry Pi defconfigs
#: What the image ships in uboot.env for the A/B flow (image-recipes/uboot/README.md).
IMAGE_ENV: dict[str, str] = {
    "rpi_slot": "A",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "3",
    "rpi_boot_A": "2",
    "rpi_root_A": "5",
    "rpi_boot_B": "3",
    "rpi_root_B": "6",
    "rpi_disk": "1234abcd",
}
#: A few variables of U-Boot's compiled-in default environment (include/configs/rpi.h), which
#: it runs on when the stored one fails its CRC.
BUILTIN_ENV: dict[str, str] = {
    "kernel_addr_r": "0x00080000",
    "fdt_addr_r": "0x02600000",
    "scriptaddr": "0x02400000",
}
#: Set by the board code at every boot: where the firmware's device tree is.
BOARD_ENV: dict[str, str] = {"fdt_addr": "0x2eff2e00"}
FIRMWARE_BOOTARGS = "coherent_pool=1M console=ttyS0,115200 console=tty1 panic=10"
_MAX_RESETS = 16


class SimError(RuntimeError):
    """The script left the subset this interpreter knows, or broke a U-Boot rule."""


# ====================================================================== environment files


def env_image(
    variables: Mapping[str, str], *, size: int = ENV_SIZE, flags: int | None = None
) -> bytes:
    """One environment copy as U-Boot stores it: CRC32 (little-endian) of the data area, then,
    for redundant copies only, the ``flags`` byte, then ``name=value\\0`` sorted, a final
    ``\\0``, zero padding to ``size``."""
    header = 4 if flags is None else 5
    data = b"".join(f"{name}={value}".encode() + b"\0" for name, value in sorted(variables.items()))
    data += b"\0"
    if len(data) > size - header:
        raise ValueError(f"environment of {len(data)} bytes does not fit {size - header}")
    data = data.ljust(size - header, b"\0")
    crc = zlib.crc32(data).to_bytes(4, "little")
    return crc + (b"" if flags is None else bytes([flags])) + data


def make_env(
    directory: Path,
    variables: Mapping[str, str] = IMAGE_ENV,
    *,
    redundant: bool = False,
    size: int = ENV_SIZE,
) -> Path:
    """Write ``uboot.env`` (and with ``redundant`` ``uboot-redund.env``, U-Boot's FAT names) and
    ``fw_env.config`` naming them; return the config. Redundant copies are both valid, the
    first current (flags 1 over 0), as after an ordinary ``saveenv``."""
    directory.mkdir(parents=True, exist_ok=True)
    first = directory / "uboot.env"
    lines = [f"{first} 0x0000 {size:#x}"]
    if redundant:
        second = directory / "uboot-redund.env"
        first.write_bytes(env_image(variables, size=size, flags=1))
        second.write_bytes(env_image(variables, size=size, flags=0))
        lines.append(f"{second} 0x0000 {size:#x}")
    else:
        first.write_bytes(env_image(variables, size=size))
    config = directory / "fw_env.config"
    config.write_text("# written by tests/harness/ubootsim.py\n" + "\n".join(lines) + "\n")
    return config


def printenv(config: Path, tool: str = "fw_printenv") -> dict[str, str] | None:
    """The stored environment via the real ``fw_printenv``; None when it fails its CRC."""
    result = _tool([tool, "-c", str(config)])
    if result.returncode != 0 or "Cannot read environment" in result.stderr:
        return None
    variables: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition("=")
        variables[name] = value
    return variables


def _setenv(config: Path, script: str, tool: str, defaults: str | None) -> None:
    """One ``fw_setenv -s`` write; ``defaults`` (``-f``) lets it write over a bad CRC, as
    U-Boot's ``saveenv`` writes a whole new environment whatever was stored."""
    with tempfile.TemporaryDirectory(prefix="ubootsim-") as tmp:
        script_file = Path(tmp) / "script"
        script_file.write_text(script)
        argv = [tool, "-c", str(config), "-s", str(script_file)]
        if defaults is not None:
            (Path(tmp) / "defaults").write_text(defaults)
            argv += ["-f", str(Path(tmp) / "defaults")]
        result = _tool(argv)
    if result.returncode != 0:
        raise SimError(f"saveenv: {tool} exit {result.returncode}: {result.stderr.strip()}")


def _tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {"LANG": "C", "LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, env=env, check=False)


# ====================================================================== the hush subset: parsing


@dataclass(frozen=True, slots=True)
class Command:
    words: tuple[str, ...]  # raw, quotes kept: expanded when run
    line: int


@dataclass(frozen=True, slots=True)
class If:
    branches: tuple[tuple[Block, Block], ...]  # (condition, body) for if and each elif
    orelse: Block
    line: int


Node = Command | If
Block = tuple[Node, ...]
_KEYWORDS = frozenset({"if", "then", "elif", "else", "fi"})
_Token = tuple[str, int]  # a raw word, or ";" for a separator (also a newline); its line


def _tokens(text: str) -> list[_Token]:
    """Split into raw words and separators. Quotes stay in the word (expansion needs them);
    ``#`` at the start of a word comments out the rest of the line."""
    tokens: list[_Token] = []
    word: list[str] = []
    line, i = 1, 0

    def end_word() -> None:
        if word:
            tokens.append(("".join(word), line))
            word.clear()

    while i < len(text):
        ch = text[i]
        if ch == "#" and not word:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        if ch in " \t":
            end_word()
        elif ch in ";\n":
            end_word()
            tokens.append((";", line))
            line += ch == "\n"
        elif ch in "\"'":
            end = _closing_quote(text, i)
            word.append(text[i : end + 1])
            line += text.count("\n", i, end)
            i = end
        elif ch == "\\":
            word.append(text[i : i + 2])
            i += 1
        elif ch in "&|<>()":
            raise SimError(f"boot.cmd line {line}: {ch!r} is outside the supported hush subset")
        else:
            word.append(ch)
        i += 1
    end_word()
    return tokens


def _closing_quote(text: str, start: int) -> int:
    quote, i = text[start], start + 1
    while i < len(text) and text[i] != quote:
        i += 2 if quote == '"' and text[i] == "\\" else 1
    if i >= len(text):
        raise SimError(f"boot.cmd: unterminated {quote} quote")
    return i


class _Parser:
    """Recursive descent over the tokens: commands, and ``if``/``elif``/``else``/``fi``."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def block(self, stops: frozenset[str]) -> tuple[Block, str | None]:
        nodes: list[Node] = []
        while True:
            while self.pos < len(self.tokens) and self.tokens[self.pos][0] == ";":
                self.pos += 1
            if self.pos == len(self.tokens):
                if stops:
                    raise SimError(f"boot.cmd: end of script, expected one of {sorted(stops)}")
                return tuple(nodes), None
            word, line = self.tokens[self.pos]
            if word in stops:
                self.pos += 1
                return tuple(nodes), word
            if word == "if":
                nodes.append(self.if_())
            elif word in _KEYWORDS:
                raise SimError(f"boot.cmd line {line}: unexpected {word!r}")
            else:
                nodes.append(self.command())

    def if_(self) -> If:
        line = self.tokens[self.pos][1]
        self.pos += 1
        branches: list[tuple[Block, Block]] = []
        keyword: str | None = "elif"
        while keyword == "elif":
            condition, _ = self.block(frozenset({"then"}))
            body, keyword = self.block(frozenset({"elif", "else", "fi"}))
            branches.append((condition, body))
        orelse: Block = ()
        if keyword == "else":
            orelse, _ = self.block(frozenset({"fi"}))
        return If(tuple(branches), orelse, line)

    def command(self) -> Command:
        line = self.tokens[self.pos][1]
        words: list[str] = []
        while self.pos < len(self.tokens) and self.tokens[self.pos][0] != ";":
            words.append(self.tokens[self.pos][0])
            self.pos += 1
        return Command(tuple(words), line)


def parse_script(text: str) -> Block:
    """The script as a tree of :class:`Command` and :class:`If`; SimError outside the subset."""
    nodes, _ = _Parser(_tokens(text)).block(frozenset())
    return nodes


def commands(nodes: Block) -> list[Command]:
    """Every command in the tree, conditions included, in script order."""
    found: list[Command] = []
    for node in nodes:
        if isinstance(node, Command):
            found.append(node)
            continue
        for condition, body in node.branches:
            found += commands(condition) + commands(body)
        found += commands(node.orelse)
    return found


# ====================================================================== expansion, U-Boot's parsers

_VAR = re.compile(r"\$(?:\{(?P<braced>\w+)\}|(?P<bare>\w+))")


def _expand(raw: str, env: Mapping[str, str]) -> list[str]:
    """One raw word to its arguments: ``${name}``/``$name`` expanded (outside single quotes),
    quotes removed, unquoted expansions split on blanks; an unquoted empty word vanishes."""
    fields: list[str] = []
    current: list[str] = []
    present = False
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch in "\"'":
            end = _closing_quote(raw, i)
            inner = raw[i + 1 : end]
            current.append(inner if ch == "'" else _in_double_quotes(inner, env))
            present, i = True, end + 1
        elif ch == "\\":
            current.append(raw[i + 1 : i + 2])
            present, i = True, i + 2
        elif (match := _VAR.match(raw, i)) is not None:
            pieces = re.split(r"[ \t\n]+", _lookup(env)(match))
            current.append(pieces[0])
            present = present or bool(pieces[0])
            for piece in pieces[1:]:
                if present:
                    fields.append("".join(current))
                current, present = [piece], bool(piece)
            i = match.end()
        else:
            current.append(ch)
            present, i = True, i + 1
    if present:
        fields.append("".join(current))
    return fields


def _lookup(env: Mapping[str, str]) -> Callable[[re.Match[str]], str]:
    return lambda match: env.get(match.group("braced") or match.group("bare"), "")


_IN_QUOTES = re.compile(r"\\(?P<escaped>[\\\"$])|" + _VAR.pattern)


def _in_double_quotes(text: str, env: Mapping[str, str]) -> str:
    """Inside "...": ``\\``, ``\\"`` and ``\\$`` escape, variables expand, nothing splits."""
    lookup = _lookup(env)
    return _IN_QUOTES.sub(lambda m: m.group("escaped") or lookup(m), text)


def simple_strtol(text: str, base: int) -> int:
    """U-Boot's ``simple_strtol``: optional ``-``, base 0 picks 16 for ``0x``, 8 for a leading
    ``0``, else 10; stops at the first character that is not a digit; nothing parsed is 0."""
    sign = -1 if text.startswith("-") else 1
    text = text[1:] if sign < 0 else text
    if base in (0, 16) and text[:2].lower() == "0x":
        base, text = 16, text[2:]
    elif base == 0:
        base = 8 if text.startswith("0") else 10
    digits = re.match(r"[0-9a-zA-Z]*", text)
    value = 0
    for ch in digits.group(0) if digits else "":
        digit = int(ch, 36)
        if digit >= base:
            break
        value = value * base + digit
    return sign * value


_STRING_OPS: dict[str, Callable[[str, str], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}
_INT_OPS: dict[str, Callable[[int, int], bool]] = {
    "-eq": lambda a, b: a == b,
    "-ne": lambda a, b: a != b,
    "-lt": lambda a, b: a < b,
    "-le": lambda a, b: a <= b,
    "-gt": lambda a, b: a > b,
    "-ge": lambda a, b: a >= b,
}
#: cmd/test.c's op_adv table, in its order: (index of the operator word, operator, words used).
_TEST_OPS: tuple[tuple[int, str, int], ...] = (
    *((1, op, 3) for op in _STRING_OPS),
    *((1, op, 3) for op in _INT_OPS),
    (0, "!", 1),
    (0, "-o", 1),
    (0, "-a", 1),
    (0, "-z", 2),
    (0, "-n", 2),
    (0, "-e", 4),
)


def u_boot_test(args: list[str]) -> bool:
    """``test`` as U-Boot's cmd/test.c evaluates it (``args`` without the command name), ported
    line by line: fewer than two arguments is false; ``!``, ``-a``, ``-o`` apply left to right;
    words it cannot read end the evaluation as *true*. ``-e`` (a file exists) is unsupported."""
    if len(args) < 2:
        return False
    expr, last_expr, last_unop, last_binop, i = False, False, "", "", 0
    while i < len(args):
        left = len(args) - i
        found = next(
            ((at, op, adv) for at, op, adv in _TEST_OPS if left > at and args[i + at] == op), None
        )
        if found is None or left < found[2]:
            return True
        _, op, adv = found
        if op in _STRING_OPS:
            expr = _STRING_OPS[op](args[i], args[i + 2])
        elif op in _INT_OPS:
            expr = _INT_OPS[op](simple_strtol(args[i], 0), simple_strtol(args[i + 2], 0))
        elif op in ("-z", "-n"):
            expr = (args[i + 1] == "") == (op == "-z")
        elif op == "-e":
            raise SimError("test -e is not supported by ubootsim")
        if op in ("-o", "-a"):
            last_expr, last_binop = expr, op
        elif op == "!":
            last_unop = "" if last_unop == "!" else "!"
        else:
            if last_unop == "!":
                expr, last_unop = not expr, ""
            if last_binop == "-o":
                expr = last_expr or expr
            elif last_binop == "-a":
                expr = last_expr and expr
            last_binop = ""
        i += adv
    return expr


# ====================================================================== running a boot


@dataclass(frozen=True, slots=True)
class Boot:
    """What one power-on came to: the slot and kernel command line handed to Linux."""

    slot: str  # rpi_updater.slot= from the command line
    cmdline: str
    boot_partition: int  # the partition the kernel was loaded from
    kernel: str
    resets: int  # script runs that ended in ``reset`` before this boot
    env_was_default: bool  # the stored env failed its CRC on the first run
    log: tuple[str, ...]  # echo output and U-Boot's warnings, all runs


class _Booted(Exception):  # control flow, not an error
    def __init__(self, argv: list[str]) -> None:
        super().__init__("booted")
        self.argv = argv


class _Reset(Exception):  # control flow, not an error
    pass


@dataclass
class _Run:
    """One execution of the script: the in-memory env and what the commands did."""

    env: dict[str, str]
    stored: dict[str, str] | None  # what fw_printenv read (None: bad CRC)
    log: list[str]
    loaded: dict[str, tuple[int, str]] = field(default_factory=dict)  # addr -> (part, file)
    fdt: str | None = None


class UBootSim:
    """U-Boot on a Pi, one :meth:`boot` per power-on, over the env that ``fw_env_config`` names.

    ``missing_kernels`` lists boot partitions whose kernel ``fatload`` cannot find (a broken
    slot); ``cmdline_out``, when given, receives the command line of each boot, to hand to
    :class:`~updater.bootloader.uboot.UBoot` as its ``/proc/cmdline``.
    """

    def __init__(
        self,
        fw_env_config: Path,
        *,
        script: Path = BOOT_CMD,
        cmdline_out: Path | None = None,
        firmware_bootargs: str = FIRMWARE_BOOTARGS,
        missing_kernels: frozenset[int] = frozenset(),
        builtin_env: Mapping[str, str] = BUILTIN_ENV,
        tools: tuple[str, str] = ("fw_printenv", "fw_setenv"),
    ) -> None:
        self.config = fw_env_config
        self.program = parse_script(script.read_text())
        self.cmdline_out = cmdline_out
        self.firmware_bootargs = firmware_bootargs
        self.missing_kernels = missing_kernels
        self.builtin_env = dict(builtin_env)
        self.printenv_tool, self.setenv_tool = tools
        self.boots: list[Boot] = []
        self._handlers: dict[str, Callable[[_Run, list[str]], int]] = {
            "setenv": self._setenv,
            "setexpr": self._setexpr,
            "saveenv": self._saveenv,
            "test": lambda run, args: 0 if u_boot_test(args) else 1,
            "echo": self._echo,
            "fdt": self._fdt,
            "fatload": self._fatload,
            "booti": self._boot,
            "bootz": self._boot,
            "reset": self._reset,
        }

    @property
    def last(self) -> Boot:
        """The latest boot (its command line, partition, log)."""
        return self.boots[-1]

    def boot(self) -> str:
        """Power on: run the script until a kernel boots (a ``reset`` runs it again, as the
        board would); return the slot booted. The details are in :attr:`last`."""
        log: list[str] = []
        first_default: bool | None = None
        for resets in range(_MAX_RESETS):
            run = self._power_on(log)
            first_default = run.stored is None if first_default is None else first_default
            try:
                self._block(run, self.program)
            except _Reset:
                log.append("resetting ...")
                continue
            except _Booted as booted:
                return self._record(run, booted.argv, resets, first_default, log)
            raise SimError(
                "boot.cmd ended without a kernel booting: U-Boot would sit at its prompt"
            )
        raise SimError(f"boot loop: {_MAX_RESETS} resets without a kernel booting")

    # ------------------------------------------------------------------ power-on and the result

    def _power_on(self, log: list[str]) -> _Run:
        stored = printenv(self.config, self.printenv_tool)
        if stored is None:
            log.append("*** Warning - bad CRC, using default environment")
        env = dict(self.builtin_env if stored is None else stored)
        env.update(BOARD_ENV)
        return _Run(env=env, stored=stored, log=log)

    def _record(
        self, run: _Run, argv: list[str], resets: int, env_was_default: bool, log: list[str]
    ) -> str:
        partition, kernel = run.loaded[argv[1]]
        cmdline = run.env.get("bootargs", "")
        slots = [w.partition("=")[2] for w in cmdline.split() if w.startswith("rpi_updater.slot=")]
        if not slots:
            raise SimError(f"booted without rpi_updater.slot= on the command line: {cmdline!r}")
        boot = Boot(slots[-1], cmdline, partition, kernel, resets, env_was_default, tuple(log))
        self.boots.append(boot)
        if self.cmdline_out is not None:
            self.cmdline_out.write_text(cmdline + "\n")
        return boot.slot

    # ------------------------------------------------------------------ the interpreter

    def _block(self, run: _Run, nodes: Block) -> int:
        status = 0
        for node in nodes:
            status = self._command(run, node) if isinstance(node, Command) else self._if(run, node)
        return status

    def _if(self, run: _Run, node: If) -> int:
        for condition, body in node.branches:
            if self._block(run, condition) == 0:
                return self._block(run, body)
        return self._block(run, node.orelse)

    def _command(self, run: _Run, command: Command) -> int:
        argv = [arg for word in command.words for arg in _expand(word, run.env)]
        if not argv:
            return 0
        handler = self._handlers.get(argv[0])
        if handler is None:
            raise SimError(f"boot.cmd line {command.line}: ubootsim does not know {argv[0]!r}")
        return handler(run, argv[1:])

    # ------------------------------------------------------------------ the commands

    def _setenv(self, run: _Run, args: list[str]) -> int:
        if not args:
            return 1
        value = " ".join(args[1:])
        if value:
            run.env[args[0]] = value
        else:
            run.env.pop(args[0], None)
        return 0

    def _setexpr(self, run: _Run, args: list[str]) -> int:
        """``setexpr name a op b``: operands and result in hex, as U-Boot's cmd/setexpr.c."""
        if len(args) != 4 or args[2] not in ("+", "-", "*", "/", "%", "&", "|", "^"):
            raise SimError(f"setexpr {' '.join(args)}: ubootsim knows 'name a <op> b' only")
        a, b = simple_strtol(args[1], 16), simple_strtol(args[3], 16)
        ops: dict[str, Callable[[int, int], int]] = {
            "+": lambda x, y: x + y,
            "-": lambda x, y: x - y,
            "*": lambda x, y: x * y,
            "/": lambda x, y: x // y,
            "%": lambda x, y: x % y,
            "&": lambda x, y: x & y,
            "|": lambda x, y: x | y,
            "^": lambda x, y: x ^ y,
        }
        run.env[args[0]] = format(ops[args[2]](a, b) & 0xFFFFFFFFFFFFFFFF, "x")
        return 0

    def _saveenv(self, run: _Run, args: list[str]) -> int:
        """Write the whole in-memory environment, as U-Boot does: set every variable, delete
        what was stored and is gone; over a bad CRC, start from nothing (``-f``)."""
        stored = printenv(self.config, self.printenv_tool)
        script = "".join(f"{name}={value}\n" for name, value in sorted(run.env.items()))
        script += "".join(f"{name}=\n" for name in sorted(stored or {}) if name not in run.env)
        _setenv(self.config, script, self.setenv_tool, "" if stored is None else None)
        run.log.append("Saving Environment to FAT... OK")
        return 0

    def _echo(self, run: _Run, args: list[str]) -> int:
        run.log.append(" ".join(args))
        return 0

    def _fdt(self, run: _Run, args: list[str]) -> int:
        if len(args) == 2 and args[0] == "addr":
            run.fdt = args[1]
            return 0
        if args[:1] == ["get"] and args[1:2] == ["value"] and args[3:] == ["/chosen", "bootargs"]:
            if run.fdt != BOARD_ENV["fdt_addr"]:
                raise SimError(f"fdt get before 'fdt addr ${{fdt_addr}}' (addr {run.fdt})")
            run.env[args[2]] = self.firmware_bootargs
            return 0
        raise SimError(f"fdt {' '.join(args)}: ubootsim knows 'addr' and '/chosen bootargs'")

    def _fatload(self, run: _Run, args: list[str]) -> int:
        """``fatload mmc 0:N addr file``: fails for a partition in ``missing_kernels``."""
        if len(args) != 4 or args[0] != "mmc" or not re.fullmatch(r"0:\d+", args[1]):
            raise SimError(f"fatload {' '.join(args)}: expected 'mmc 0:N addr file'")
        partition = int(args[1].partition(":")[2])
        if partition in self.missing_kernels:
            run.log.append(f"** Unable to read file {args[3]} **")
            return 1
        run.loaded[args[2]] = (partition, args[3])
        run.env["filesize"] = "1000000"
        return 0

    def _boot(self, run: _Run, args: list[str]) -> int:
        if not args or args[0] not in run.loaded:
            run.log.append("Bad Linux ARM64 Image magic!")
            return 1
        raise _Booted(["booti", *args])

    def _reset(self, run: _Run, args: list[str]) -> int:
        raise _Reset
