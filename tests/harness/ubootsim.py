"""U-Boot's part of a reboot, for tests: run the shipped boot script over a real env file.

:class:`UBootSim` does what U-Boot does at power-on, minus the hardware, on one of two
:class:`Platform` builds, and then **interprets the shipped script itself**: there is no second
copy of the A/B logic to drift from it, a change to the script changes what the tests see, and a
command the interpreter does not know, or the platform's U-Boot does not have, fails loudly.

- :data:`PI`, the Raspberry Pi: U-Boot loads the stored environment itself (here with the real
  ``fw_printenv``, from the same fw_env.config the updater uses; on a bad CRC, U-Boot's built-in
  default), the board code adds ``fdt_addr``, then ``image-recipes/uboot/boot.cmd`` runs:
  ``saveenv`` writes with the real ``fw_setenv``, ``booti`` ends the boot.
- :data:`QEMU_X86`, Debian's u-boot-qemu in a VM: nothing is stored (ENV_IS_NOWHERE); boot.scr is
  ``qemu-x86.cmd`` + ``boot.cmd``, whose ``fatload`` + ``env import -c`` read ``uboot.env`` from
  FAT partition 1 (a directory here, by default the one holding the env file that fw_env.config
  names) and whose ``env export -c`` + ``fatwrite`` write it back, over a model of RAM. Linux's
  side of that file stays the real ``fw_printenv``/``fw_setenv``; ``zboot`` ends the boot.

The interpreter covers the hush subset the scripts use, with the semantics of U-Boot's hush where
they differ from a POSIX shell (each checked against U-Boot 2023.01 at its prompt):

- a command that expands a variable is expanded and then *parsed again* (hush's
  ``make_string``): every quoted word is re-quoted with ``'...'``, unquoted values split on
  blanks, and quotes or a leading ``#`` inside values take effect then; ``;`` and ``$`` in values
  do not;
- ``'`` inside ``"..."`` still quotes: ``"a '${x}' b"`` is ``a ${x} b``;
- ``setenv name`` deletes, ``setenv name "${empty}"`` sets an empty value;
- an ``if`` whose conditions all fail and that has no ``else`` returns the last condition's status;
- ``run`` parses a variable's value as a script (``;`` and newlines separate commands); its status
  is that of the last command the value ran (``'false; true'`` succeeds), and of several variables
  the first that fails ends it;
- ``test`` is ported from ``cmd/test.c`` (fewer than 2 arguments is false, numbers by
  ``simple_strtol(s, NULL, 0)``), ``setexpr`` reads and writes hex;
- a command takes at most CONFIG_SYS_MAXARGS (16) words, its name included;
- ``fatload ... FILE BYTES`` loads at most BYTES and sets ``filesize`` (hex, no ``0x``) to what it
  read; RAM past what was loaded is not zeros but leftovers, so reading it is a SimError.

Writes can be made to fail, as on a damaged FAT: the partitions in :attr:`UBootSim.unwritable`
refuse ``fatwrite``, and on the Pi partition 1 refuses ``saveenv`` (so does a failing
``fw_setenv``); the command then returns 1, as U-Boot's does.

Not covered: ``&&``/``||``, pipes, loops, backslashes (hush keeps them inside quotes), hush local
variables (``name=value``), ``$?``.

:func:`make_env` writes a fresh environment (CRC32 little-endian + ``name=value`` NUL-separated,
double NUL, padded; with redundant copies a flags byte after the CRC) and its fw_env.config.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BOARD_ENV",
    "BOOT_CMD",
    "BUILTIN_ENV",
    "ENV_SIZE",
    "IMAGE_ENV",
    "MAXARGS",
    "PI",
    "PI_ENV_PARTITION",
    "QEMU_CMD",
    "QEMU_X86",
    "Block",
    "Boot",
    "Command",
    "Executed",
    "Platform",
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

RECIPES = Path(__file__).resolve().parents[2] / "image-recipes" / "uboot"
BOOT_CMD = RECIPES / "boot.cmd"
QEMU_CMD = RECIPES / "qemu-x86.cmd"
ENV_SIZE = 0x4000  # CONFIG_ENV_SIZE of the Raspberry Pi defconfigs; fw_env.config's size
#: CONFIG_SYS_MAXARGS of both builds (the Kconfig default): words of one command, name included.
MAXARGS = 16
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
#: The default environment of Debian's qemu-x86 U-Boot 2023.01 (the part a script can see).
QEMU_BUILTIN_ENV: dict[str, str] = {
    "bootcmd": "run distro_bootcmd",
    "kernel_addr_r": "0x1000000",
    "ramdisk_addr_r": "0x4000000",
    "scriptaddr": "0x7000000",
    "loadaddr": "0x02000000",
}
#: What distro boot has set when it sources boot.scr from virtio 0:1.
QEMU_BOARD_ENV: dict[str, str] = {
    "devtype": "virtio",
    "devnum": "0",
    "distro_bootpart": "1",
    "prefix": "/",
}
#: Where zboot's kernel decompresses itself: from LOAD_PHYSICAL_ADDR (16 MiB) over its init_size
#: (0x3378000 for Debian's 6.1 cloud kernel, rounded up). An initrd there is overwritten.
ZBOOT_DECOMPRESS = (0x1000000, 0x4400000)
#: The partition the Pi's U-Boot keeps uboot.env on (ENV_FAT_DEVICE_AND_PART "0:1").
PI_ENV_PARTITION = 1
_MAX_RESETS = 16
_MAX_RUN_DEPTH = 8


class SimError(RuntimeError):
    """The script left the subset this interpreter knows, or broke a U-Boot rule."""


# ====================================================================== environment files


def env_image(
    variables: Mapping[str, str], *, size: int = ENV_SIZE, flags: int | None = None
) -> bytes:
    """One environment copy as U-Boot stores it: CRC32 (little-endian) of the data area, then,
    for redundant copies only, the ``flags`` byte, then ``name=value\\0`` sorted, a final
    ``\\0``, zero padding to ``size``. U-Boot's ``env export -c -s size`` writes the same."""
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


def _setenv(config: Path, script: str, tool: str, defaults: str | None) -> str | None:
    """One ``fw_setenv -s`` write; ``defaults`` (``-f``) lets it write over a bad CRC, as
    U-Boot's ``saveenv`` writes a whole new environment whatever was stored. The error, or None
    when it wrote."""
    with tempfile.TemporaryDirectory(prefix="ubootsim-") as tmp:
        script_file = Path(tmp) / "script"
        script_file.write_text(script)
        argv = [tool, "-c", str(config), "-s", str(script_file)]
        if defaults is not None:
            (Path(tmp) / "defaults").write_text(defaults)
            argv += ["-f", str(Path(tmp) / "defaults")]
        result = _tool(argv)
    if result.returncode != 0:
        return f"{tool} exit {result.returncode}: {result.stderr.strip()}"
    return None


def _tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {"LANG": "C", "LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, env=env, check=False)


# ====================================================================== the hush subset: parsing


@dataclass(frozen=True, slots=True)
class Command:
    words: tuple[str, ...]  # raw, quotes kept: expanded when run
    line: int
    source: str = "boot.cmd"  # the file, or "run NAME" for a variable's commands


@dataclass(frozen=True, slots=True)
class If:
    branches: tuple[tuple[Block, Block], ...]  # (condition, body) for if and each elif
    orelse: Block
    line: int


Node = Command | If
Block = tuple[Node, ...]
_KEYWORDS = frozenset({"if", "then", "elif", "else", "fi"})
_Token = tuple[str, int]  # a raw word, or ";" for a separator (also a newline); its line


def _tokens(text: str, source: str) -> list[_Token]:
    """Split into raw words and separators, as hush's parser does before anything runs. Quotes
    stay in the word (expansion needs them); ``#`` at the start of a word comments out the rest
    of the line."""
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
            end = _closing_quote(text, i, f"{source} line {line}")
            word.append(text[i : end + 1])
            line += text.count("\n", i, end)
            i = end
        elif ch in "\\&|<>()":
            where = f"{source} line {line}"
            raise SimError(f"{where}: {ch!r} is outside the supported hush subset")
        else:
            word.append(ch)
        i += 1
    end_word()
    return tokens


def _closing_quote(text: str, start: int, where: str) -> int:
    """The index of the quote that closes the one at ``start``. In U-Boot's hush a ``'`` inside
    ``"..."`` opens a single-quoted section of its own (a ``"`` in there does not close)."""
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == text[start]:
            return i
        if text[start] == '"' and ch == "'":
            i = _closing_quote(text, i, where)
        elif text[start] == '"' and ch == "\\":
            raise SimError(f"{where}: a backslash inside quotes (hush keeps it): not modelled")
        i += 1
    raise SimError(f"{where}: unterminated {text[start]} quote")


class _Parser:
    """Recursive descent over the tokens: commands, and ``if``/``elif``/``else``/``fi``."""

    def __init__(self, tokens: list[_Token], source: str) -> None:
        self.tokens = tokens
        self.source = source
        self.pos = 0

    def block(self, stops: frozenset[str]) -> tuple[Block, str | None]:
        nodes: list[Node] = []
        while True:
            while self.pos < len(self.tokens) and self.tokens[self.pos][0] == ";":
                self.pos += 1
            if self.pos == len(self.tokens):
                if stops:
                    raise SimError(f"{self.source}: end of script, expected one of {sorted(stops)}")
                return tuple(nodes), None
            word, line = self.tokens[self.pos]
            if word in stops:
                self.pos += 1
                return tuple(nodes), word
            if word == "if":
                nodes.append(self.if_())
            elif word in _KEYWORDS:
                raise SimError(f"{self.source} line {line}: unexpected {word!r}")
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
        return Command(tuple(words), line, self.source)


def parse_script(text: str, source: str = "boot.cmd") -> Block:
    """The script as a tree of :class:`Command` and :class:`If`; SimError outside the subset.
    ``source`` names it in messages."""
    nodes, _ = _Parser(_tokens(text, source), source).block(frozenset())
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


def _scan(raw: str, env: Mapping[str, str]) -> tuple[str, bool, bool]:
    """Hush's first pass over one raw word: (its text with quotes removed and variables outside
    ``'...'`` expanded, whether it was quoted at all, whether it expanded a variable)."""
    text: list[str] = []
    quoted = expanded = False
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "'":
            end = raw.index("'", i + 1)
            text.append(raw[i + 1 : end])
            quoted, i = True, end + 1
        elif ch == '"':
            quoted, i = True, i + 1
        elif (match := _VAR.match(raw, i)) is not None:
            text.append(env.get(match.group("braced") or match.group("bare"), ""))
            expanded, i = True, match.end()
        else:
            text.append(ch)
            i += 1
    return "".join(text), quoted, expanded


def _argv(words: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """A command's arguments as U-Boot's hush makes them. Without a variable, the words with
    their quotes removed. With one, hush's ``make_string``: each word expanded, a quoted word
    wrapped in ``'...'``, joined by blanks, and the line parsed again without ``$`` and ``;``."""
    scanned = [_scan(word, env) for word in words]
    if not any(expanded for _, _, expanded in scanned):
        return [text for text, _, _ in scanned]
    return _reparse(" ".join(f"'{text}'" if quoted else text for text, quoted, _ in scanned))


def _unquote(quoted: str) -> str:
    """A quoted section without its quotes and without expansion (``'`` inside ``"..."`` too)."""
    inner = quoted[1:-1]
    return re.sub(r"'([^']*)'", r"\1", inner) if quoted[0] == '"' else inner


def _reparse(line: str) -> list[str]:
    """Hush's second pass (FLAG_REPARSING): blanks split, quotes quote (``'`` inside ``"..."``
    too), ``#`` at the start of a word ends the command; ``$`` and ``;`` are plain characters."""
    words: list[str] = []
    word: list[str] = []
    present = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch in " \t":
            if present:
                words.append("".join(word))
            word, present = [], False
        elif ch == "#" and not present:
            break
        elif ch == "\n":
            raise SimError(f"a newline outside quotes in an expanded value: {line!r}")
        elif ch == "\\":
            raise SimError(f"a backslash in an expanded value: not modelled: {line!r}")
        elif ch in "\"'":
            try:
                end = _closing_quote(line, i, "expanded command")
            except SimError:
                raise SimError(
                    f"expanded, {line!r} has an unterminated quote: U-Boot's hush would wait "
                    "for more input (a quote inside a value?)"
                ) from None
            word.append(_unquote(line[i : end + 1]))
            present, i = True, end
        else:
            word.append(ch)
            present = True
        i += 1
    if present:
        words.append("".join(word))
    return words


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


# ====================================================================== platforms


@dataclass(frozen=True)
class Platform:
    """One U-Boot build the A/B script runs on, as far as the script can tell."""

    name: str
    scripts: tuple[Path, ...]  # concatenated, in this order, into its boot.scr
    disk: str  # "interface devnum" of the disk holding the partitions
    #: The commands of this build that ubootsim models *for it*; anything else the script runs
    #: fails as U-Boot would have printed "Unknown command" (or ubootsim cannot tell the result).
    commands: frozenset[str]
    builtin_env: Mapping[str, str]  # U-Boot's compiled-in default environment
    board_env: Mapping[str, str]  # set before the script runs, at every power-on
    #: U-Boot loads the stored environment before the script (the Pi's ENV_IS_IN_FAT) rather
    #: than the script doing it (ENV_IS_NOWHERE).
    stored_env: bool


_BOTH = frozenset({"setenv", "test", "echo", "run", "env", "fatload", "fatwrite", "reset"})
#: The Raspberry Pi: boot.cmd alone, the env stored by U-Boot in uboot.env on mmc 0:1.
PI = Platform(
    name="rpi",
    scripts=(BOOT_CMD,),
    disk="mmc 0",
    commands=_BOTH | {"setexpr", "saveenv", "fdt", "booti", "bootz"},
    builtin_env=BUILTIN_ENV,
    board_env=BOARD_ENV,
    stored_env=True,
)
#: Debian's u-boot-qemu (qemu-x86, 2023.01) in qemu-system-x86_64: no saveenv, no setexpr (its
#: fdt command is left out: there is no firmware device tree to read a command line from).
QEMU_X86 = Platform(
    name="qemu-x86",
    scripts=(QEMU_CMD, BOOT_CMD),
    disk="virtio 0",
    commands=_BOTH | {"zboot"},
    builtin_env=QEMU_BUILTIN_ENV,
    board_env=QEMU_BOARD_ENV,
    stored_env=False,
)


# ====================================================================== running a boot


@dataclass(frozen=True, slots=True)
class Boot:
    """What one power-on came to: the slot and kernel command line handed to Linux."""

    slot: str  # rpi_updater.slot= from the command line
    cmdline: str
    boot_partition: int  # the partition the kernel was loaded from
    kernel: str
    resets: int  # script runs that ended in ``reset`` before this boot
    env_was_default: bool  # the first run found no valid stored env (bad CRC, no file)
    log: tuple[str, ...]  # echo output and U-Boot's messages, all runs
    initrd: str | None = None  # zboot's initrd file
    command: tuple[str, ...] = ()  # the boot command as run: booti/bootz/zboot and arguments


@dataclass(frozen=True, slots=True)
class Executed:
    """What :meth:`UBootSim.execute` left: the last status, the environment, the log."""

    status: int
    env: dict[str, str]
    log: tuple[str, ...]


class _Booted(Exception):  # control flow, not an error
    def __init__(self, argv: list[str]) -> None:
        super().__init__("booted")
        self.argv = argv


class _Reset(Exception):  # control flow, not an error
    pass


class _Memory:
    """RAM as the blobs written to it, by start address. A read sees the blob that starts at its
    address; past its end (after a short fatload) RAM holds whatever it held before, so such a
    read is a SimError. A write drops the blobs it overlaps. Enough for load-then-use at fixed
    addresses, which is all a boot script does."""

    def __init__(self) -> None:
        self.blobs: dict[int, bytes] = {}

    def write(self, addr: int, data: bytes) -> None:
        end = addr + len(data)
        self.blobs = {a: b for a, b in self.blobs.items() if a + len(b) <= addr or a >= end}
        self.blobs[addr] = data

    def read(self, addr: int, size: int) -> bytes:
        blob = self.blobs.get(addr, b"")
        if len(blob) < size:
            raise SimError(
                f"reads {size:#x} bytes at {addr:#x}, but only {len(blob):#x} were loaded or "
                "written there: the rest is leftover RAM, whatever it held"
            )
        return blob[:size]


@dataclass
class _Run:
    """One execution of the script: the in-memory env and what the commands did."""

    env: dict[str, str]
    log: list[str]
    default_env: bool  # no stored environment has been loaded (yet)
    memory: _Memory = field(default_factory=_Memory)
    loaded: dict[int, tuple[int, str]] = field(default_factory=dict)  # addr -> (part, file)
    fdt: str | None = None
    depth: int = 0  # nested ``run``


def _hex(text: str) -> int:
    """An address or size as U-Boot's ``hextoul`` reads the ones scripts pass (hex, ``0x``
    optional); anything else is a script error here."""
    try:
        return int(text, 16)
    except ValueError:
        raise SimError(f"{text!r} is not a hex number") from None


def _fat_directory(fw_env_config: Path) -> Path | None:
    """The directory of the first env file fw_env.config names: partition 1, where U-Boot and
    Linux find uboot.env."""
    try:
        lines = fw_env_config.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            return Path(fields[0]).parent
    return None


class UBootSim:
    """U-Boot on ``platform``, one :meth:`boot` per power-on, over the env that
    ``fw_env_config`` names.

    ``script`` replaces the platform's boot.scr (one file, or files to concatenate).
    ``fat`` maps partitions to directories standing in for FAT file systems (``fatload`` reads,
    ``fatwrite`` writes there); by default partition 1 is the directory of the env file. Other
    partitions hold any file asked for, except the partitions in ``missing_kernels``, which
    hold none (a broken slot). Writes to the partitions in ``unwritable`` fail (see
    :attr:`unwritable`). ``cmdline_out``, when given, receives the command line of each
    boot, to hand to :class:`~updater.bootloader.uboot.UBoot` as its ``/proc/cmdline``.
    """

    def __init__(
        self,
        fw_env_config: Path,
        *,
        platform: Platform = PI,
        script: Path | Sequence[Path] | None = None,
        cmdline_out: Path | None = None,
        firmware_bootargs: str = FIRMWARE_BOOTARGS,
        missing_kernels: frozenset[int] = frozenset(),
        builtin_env: Mapping[str, str] | None = None,
        tools: tuple[str, str] = ("fw_printenv", "fw_setenv"),
        fat: Mapping[int, Path] | None = None,
        unwritable: Iterable[int] = (),
    ) -> None:
        self.config = fw_env_config
        self.platform = platform
        files = platform.scripts if script is None else script
        files = (files,) if isinstance(files, Path) else tuple(files)
        self.program: Block = tuple(
            node for path in files for node in parse_script(path.read_text(), path.name)
        )
        self.cmdline_out = cmdline_out
        self.firmware_bootargs = firmware_bootargs
        self.missing_kernels = missing_kernels
        self.builtin_env = dict(platform.builtin_env if builtin_env is None else builtin_env)
        self.printenv_tool, self.setenv_tool = tools
        if fat is None:
            directory = _fat_directory(fw_env_config)
            fat = {} if directory is None else {1: directory}
        self.fat = dict(fat)
        #: Partitions whose writes fail (a damaged FAT): fatwrite there, and on the Pi saveenv
        #: (its uboot.env is on partition 1), return 1. May be changed between boots.
        self.unwritable: set[int] = set(unwritable)
        self.boots: list[Boot] = []
        self._handlers: dict[str, Callable[[_Run, list[str]], int]] = {
            "setenv": self._setenv,
            "setexpr": self._setexpr,
            "saveenv": self._saveenv,
            "test": lambda run, args: 0 if u_boot_test(args) else 1,
            "echo": self._echo,
            "run": self._run,
            "env": self._env,
            "fdt": self._fdt,
            "fatload": self._fatload,
            "fatwrite": self._fatwrite,
            "booti": self._boot,
            "bootz": self._boot,
            "zboot": self._zboot,
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
            ended: _Booted | _Reset | None = None
            try:
                self._block(run, self.program)
            except (_Booted, _Reset) as end:
                ended = end
            first_default = run.default_env if first_default is None else first_default
            if isinstance(ended, _Booted):
                return self._record(run, ended.argv, resets, first_default, log)
            if ended is None:
                raise SimError(
                    "the boot script ended without a kernel booting: U-Boot would go on with "
                    "the next boot target"
                )
            log.append("resetting ...")
        raise SimError(f"boot loop: {_MAX_RESETS} resets without a kernel booting")

    def execute(self, text: str) -> Executed:
        """Run ``text`` (hush commands) once, in a power-on environment of the platform, and
        return what it left; for tests of the interpreter. A boot or reset is a SimError."""
        run = self._power_on([])
        try:
            status = self._block(run, parse_script(text, "snippet"))
        except (_Booted, _Reset) as end:
            raise SimError(f"the snippet ended in {type(end).__name__}") from None
        return Executed(status, run.env, tuple(run.log))

    # ------------------------------------------------------------------ power-on and the result

    def _power_on(self, log: list[str]) -> _Run:
        env = dict(self.builtin_env)
        default = True
        if self.platform.stored_env:
            stored = printenv(self.config, self.printenv_tool)
            if stored is None:
                log.append("*** Warning - bad CRC, using default environment")
            else:
                env, default = dict(stored), False
        env.update(self.platform.board_env)
        return _Run(env=env, log=log, default_env=default)

    def _record(
        self, run: _Run, argv: list[str], resets: int, env_was_default: bool, log: list[str]
    ) -> str:
        partition, kernel = run.loaded[_hex(argv[1])]
        initrd = run.loaded[_hex(argv[3])][1] if argv[0] == "zboot" and len(argv) > 3 else None
        cmdline = run.env.get("bootargs", "")
        slots = [w.partition("=")[2] for w in cmdline.split() if w.startswith("rpi_updater.slot=")]
        if not slots:
            raise SimError(f"booted without rpi_updater.slot= on the command line: {cmdline!r}")
        boot = Boot(
            slots[-1], cmdline, partition, kernel, resets, env_was_default, tuple(log),
            initrd=initrd, command=tuple(argv),
        )  # fmt: skip
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
        status = 0
        for condition, body in node.branches:
            status = self._block(run, condition)
            if status == 0:
                return self._block(run, body)
        return self._block(run, node.orelse) if node.orelse else status

    def _command(self, run: _Run, command: Command) -> int:
        where = f"{command.source} line {command.line}"
        try:
            argv = _argv(command.words, run.env)
            if not argv:
                return 0
            name = argv[0]
            handler = self._handlers.get(name)
            if handler is None:
                raise SimError(f"ubootsim does not know {name!r}")
            if name not in self.platform.commands:
                raise SimError(
                    f"the {self.platform.name} U-Boot has no {name!r} as ubootsim models it "
                    "(U-Boot: Unknown command)"
                )
            if len(argv) > MAXARGS:
                raise SimError(
                    f"{name} with {len(argv)} words: CONFIG_SYS_MAXARGS is {MAXARGS} "
                    "(U-Boot prints the usage and fails)"
                )
            return handler(run, argv[1:])
        except SimError as error:
            raise SimError(f"{where}: {error}") from None

    # ------------------------------------------------------------------ the commands

    def _setenv(self, run: _Run, args: list[str]) -> int:
        """``setenv name`` deletes; with any value, even an empty quoted one, it sets."""
        if not args:
            return 1
        if len(args) == 1:
            run.env.pop(args[0], None)
        else:
            run.env[args[0]] = " ".join(args[1:])
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
        what was stored and is gone; over a bad CRC, start from nothing (``-f``). Returns 1,
        writing nothing, when partition 1 is :attr:`unwritable` or ``fw_setenv`` fails, as
        U-Boot's ``saveenv`` returns 1 when its FAT write fails."""
        empty = sorted(name for name, value in run.env.items() if not value)
        if empty:
            raise SimError(f"saveenv of empty {empty}: fw_setenv cannot store that, not modelled")
        where = f'Unable to write "uboot.env" from {self.platform.disk.replace(" ", "")}:1...'
        if PI_ENV_PARTITION in self.unwritable:
            run.log.append(f"Saving Environment to FAT... {where} Failed (1)")
            return 1
        stored = printenv(self.config, self.printenv_tool)
        script = "".join(f"{name}={value}\n" for name, value in sorted(run.env.items()))
        script += "".join(f"{name}=\n" for name in sorted(stored or {}) if name not in run.env)
        error = _setenv(self.config, script, self.setenv_tool, "" if stored is None else None)
        if error is not None:
            run.log.append(f"Saving Environment to FAT... {where} Failed (1) [{error}]")
            return 1
        run.log.append("Saving Environment to FAT... OK")
        return 0

    def _echo(self, run: _Run, args: list[str]) -> int:
        run.log.append(" ".join(args))
        return 0

    def _run(self, run: _Run, args: list[str]) -> int:
        """``run name...``: each variable's value as a script; the first that fails ends it."""
        if not args:
            return 1
        for name in args:
            value = run.env.get(name)
            if value is None:
                run.log.append(f'## Error: "{name}" not defined')
                return 1
            if run.depth >= _MAX_RUN_DEPTH:
                raise SimError(f"run {name}: nested {_MAX_RUN_DEPTH} deep (a loop?)")
            program = parse_script(value, f"run {name}")
            run.depth += 1
            try:
                status = self._block(run, program)
            finally:
                run.depth -= 1
            if status != 0:
                return 1
        return 0

    def _env(self, run: _Run, args: list[str]) -> int:
        if args[:2] == ["import", "-c"]:
            return self._env_import(run, args[2:])
        if args[:2] == ["export", "-c"]:
            return self._env_export(run, args[2:])
        raise SimError(f"env {' '.join(args)}: ubootsim knows 'import -c' and 'export -c' only")

    def _env_import(self, run: _Run, args: list[str]) -> int:
        """``env import -c ADDR SIZE [NAME...]``: check the CRC over SIZE - 4 bytes, then merge
        the ``name=value`` entries (only the NAMEs, when given; ``name=`` deletes), as
        cmd/nvedit.c + himport_r do without ``-d``."""
        if len(args) < 2:
            run.log.append("## Error: external checksum format must pass size")
            return 1
        addr, size, names = _hex(args[0]), _hex(args[1]), args[2:]
        if size <= 4:
            run.log.append(f"## Error: Invalid size {size:#X}")
            return 1
        blob = run.memory.read(addr, size)
        if zlib.crc32(blob[4:]) != int.from_bytes(blob[:4], "little"):
            run.log.append("## Error: bad CRC, import failed")
            return 1
        for entry in blob[4:].split(b"\0"):
            if not entry:
                break
            name, _, value = entry.decode().partition("=")
            if names and name not in names:
                continue
            if value:
                run.env[name] = value
            else:
                run.env.pop(name, None)
        run.default_env = False
        return 0

    def _env_export(self, run: _Run, args: list[str]) -> int:
        """``env export -c -s SIZE ADDR [NAME...]``: the NAMEs that are set (all variables when
        none is given), in the stored format, SIZE bytes with the CRC."""
        if len(args) < 3 or args[0] != "-s":
            raise SimError("env export -c: ubootsim knows '-c -s SIZE ADDR [NAME...]' only")
        size, addr, names = _hex(args[1]), _hex(args[2]), args[3:]
        chosen = {name: value for name, value in run.env.items() if not names or name in names}
        try:
            blob = env_image(chosen, size=size)
        except ValueError:
            # cmd/nvedit.c (2023.01) exports up to ENV_SIZE whatever SIZE says, and the CRC then
            # covers only the first SIZE - 4 bytes: a silently cut environment.
            raise SimError(
                f"env export -c -s {args[1]}: the variables do not fit; U-Boot would write past "
                "SIZE without an error (not modelled)"
            ) from None
        run.memory.write(addr, blob)
        return 0

    def _fdt(self, run: _Run, args: list[str]) -> int:
        if len(args) == 2 and args[0] == "addr":
            run.fdt = args[1]
            return 0
        if args[:1] == ["get"] and args[1:2] == ["value"] and args[3:] == ["/chosen", "bootargs"]:
            if run.fdt is None or run.fdt != self.platform.board_env.get("fdt_addr"):
                raise SimError(f"fdt get before 'fdt addr ${{fdt_addr}}' (addr {run.fdt})")
            run.env[args[2]] = self.firmware_bootargs
            return 0
        raise SimError(f"fdt {' '.join(args)}: ubootsim knows 'addr' and '/chosen bootargs'")

    def _partition(self, command: str, interface: str, device: str) -> int:
        """The partition number of ``IFACE DEV:PART``, which must be the platform's disk."""
        dev, _, part = device.partition(":")
        if f"{interface} {dev}" != self.platform.disk or not part.isdigit():
            raise SimError(
                f"{command} {interface} {device}: the {self.platform.name} disk is "
                f"'{self.platform.disk}', partitions as {self.platform.disk}:N"
            )
        return int(part)

    def _fat_path(self, partition: int, name: str) -> Path | None:
        """The file ``name`` on a partition given as a directory (FAT: any case), or where it
        would be created; None for the other partitions."""
        directory = self.fat.get(partition)
        if directory is None:
            return None
        if "/" in name or name in ("", ".", ".."):
            raise SimError(f"FAT file {name!r}: ubootsim models files in the root directory only")
        for path in directory.iterdir() if directory.is_dir() else ():
            if path.name.lower() == name.lower():
                return path
        return directory / name

    def _fatload(self, run: _Run, args: list[str]) -> int:
        """``fatload IFACE DEV:PART ADDR FILE [BYTES]``: a file of a directory partition, or on
        any other partition a stand-in kernel (none on the ``missing_kernels`` partitions); at
        most BYTES of it (hex), ``filesize`` what was read."""
        if len(args) not in (4, 5):
            raise SimError(f"fatload {' '.join(args)}: expected 'IFACE DEV:PART ADDR FILE [BYTES]'")
        partition = self._partition("fatload", args[0], args[1])
        addr, name = _hex(args[2]), args[3]
        path = self._fat_path(partition, name)
        data: bytes | None
        if path is not None:
            data = path.read_bytes() if path.is_file() else None
        elif partition in self.missing_kernels:
            data = None
        else:
            data = f"ubootsim {name} of partition {partition}\n".encode() * 256
        if data is None:
            run.log.append(f"Failed to load '{name}'")
            return 1
        if len(args) == 5 and _hex(args[4]) != 0:  # 0: the whole file, as U-Boot reads it
            data = data[: _hex(args[4])]
        run.memory.write(addr, data)
        run.loaded = {a: f for a, f in run.loaded.items() if a in run.memory.blobs}
        run.loaded[addr] = (partition, name)
        run.env["filesize"] = format(len(data), "x")
        return 0

    def _fatwrite(self, run: _Run, args: list[str]) -> int:
        """``fatwrite IFACE DEV:PART ADDR FILE SIZE``: SIZE bytes of memory replace the file;
        on an :attr:`unwritable` partition nothing is written and it returns 1."""
        if len(args) != 5:
            raise SimError(f"fatwrite {' '.join(args)}: expected 'IFACE DEV:PART ADDR FILE SIZE'")
        partition = self._partition("fatwrite", args[0], args[1])
        path = self._fat_path(partition, args[3])
        if path is None:
            raise SimError(f"fatwrite to partition {partition}: no directory stands in for it")
        size = _hex(args[4])
        data = run.memory.read(_hex(args[2]), size)
        if partition in self.unwritable:
            run.log.append(f"** Unable to write file {args[3]} **")
            return 1
        path.write_bytes(data)
        run.log.append(f"{size} bytes written")
        return 0

    def _loaded(self, run: _Run, addr: str, size: str, what: str) -> tuple[int, str]:
        """The file loaded at ``addr``, which must be ``size`` (hex) bytes long."""
        found = run.loaded.get(_hex(addr))
        if found is None:
            raise SimError(f"zboot: no {what} was loaded at {addr}")
        length = len(run.memory.blobs[_hex(addr)])
        if _hex(size) != length:
            raise SimError(f"zboot: {what} size {size} but {found[1]} is {length:#x} bytes")
        return found

    def _zboot(self, run: _Run, args: list[str]) -> int:
        """``zboot ADDR SIZE [INITRD_ADDR INITRD_SIZE]``: boots when the kernel and initrd were
        loaded there with those sizes and the initrd lies clear of the decompressing kernel."""
        if len(args) not in (2, 4):
            raise SimError(f"zboot {' '.join(args)}: expected 'ADDR SIZE [INITRD_ADDR SIZE]'")
        if _hex(args[0]) not in run.loaded:
            run.log.append("bzImage: bad magic")
            return 1
        self._loaded(run, args[0], args[1], "kernel")
        if len(args) == 4:
            self._loaded(run, args[2], args[3], "initrd")
            start, end = _hex(args[2]), _hex(args[2]) + _hex(args[3])
            if start < ZBOOT_DECOMPRESS[1] and end > ZBOOT_DECOMPRESS[0]:
                raise SimError(
                    f"zboot: the initrd at {args[2]} lies where the kernel decompresses "
                    f"({ZBOOT_DECOMPRESS[0]:#x}..{ZBOOT_DECOMPRESS[1]:#x}): it would be overwritten"
                )
        raise _Booted(["zboot", *args])

    def _boot(self, run: _Run, args: list[str]) -> int:
        if not args or _hex(args[0]) not in run.loaded:
            run.log.append("Bad Linux ARM64 Image magic!")
            return 1
        raise _Booted(["booti", *args])

    def _reset(self, run: _Run, args: list[str]) -> int:
        raise _Reset
