"""A small asyncio client of Network UPS Tools' upsd (the network protocol, TCP 3493).

Only what a rack needs: ``LIST VAR <ups>`` (every variable of one UPS in one
round trip), then ``LOGOUT``. The protocol is line-based text
(docs: networkupstools.org, "Network protocol information"); a reply line is

    BEGIN LIST VAR <ups>
    VAR <ups> <name> "<value>"      (quoted; \\" and \\\\ escaped)
    END LIST VAR <ups>
    ERR <CODE> [extra]

upsd is trusted no more than any peer: every line is bounded
(:data:`MAX_LINE_BYTES`), ASCII, and must parse; a list holds at most
:data:`MAX_VARS` variables; every exchange has a deadline. Anything else
raises :class:`NutError` with a sentence that says what went wrong.
The wire format (:func:`parse_var_line`, :func:`split_words`) is pure and
tested apart from the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping

from meshcloud.aio import within
from meshcloud.core.errors import MeshcloudError

DEFAULT_PORT = 3493
MAX_LINE_BYTES = 512  # upsd's own values are at most 256 bytes
MAX_VARS = 512
MAX_VALUE_LEN = 256
_UPS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VAR_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class NutError(MeshcloudError):
    """upsd could not be reached, refused the request, or answered something malformed."""


def validate_ups_name(name: str) -> str:
    """Return ``name`` if it is a valid NUT UPS name (letters, digits, ``_.-``), else raise."""
    if not isinstance(name, str) or not _UPS_NAME.fullmatch(name):
        raise NutError(
            f"UPS name {name!r:.70} must be 1-64 letters, digits, '_', '.' or '-'"
            " (the section name in ups.conf)"
        )
    return name


def split_words(line: str) -> list[str]:
    """Split one protocol line into words; double-quoted words may hold spaces and escapes."""
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        if line[i] == '"':
            i += 1
            out: list[str] = []
            while True:
                if i >= n:
                    raise NutError(f"upsd sent an unterminated quoted value: {line!r:.80}")
                ch = line[i]
                if ch == "\\":
                    if i + 1 >= n:
                        raise NutError(f"upsd sent a dangling escape: {line!r:.80}")
                    out.append(line[i + 1])
                    i += 2
                    continue
                if ch == '"':
                    i += 1
                    break
                out.append(ch)
                i += 1
            if i < n and line[i] != " ":
                raise NutError(f"upsd sent text right after a quoted value: {line!r:.80}")
            words.append("".join(out))
            continue
        j = line.find(" ", i)
        j = n if j < 0 else j
        word = line[i:j]
        if '"' in word or "\\" in word:
            raise NutError(f"upsd sent a stray quote or escape: {line!r:.80}")
        words.append(word)
        i = j
    return words


def decode_line(raw: bytes) -> str:
    """One line off the wire, without its newline; must be printable ASCII."""
    if len(raw) > MAX_LINE_BYTES:
        raise NutError(f"upsd sent a line longer than {MAX_LINE_BYTES} bytes")
    text = raw.rstrip(b"\r\n")
    try:
        line = text.decode("ascii")
    except UnicodeDecodeError:
        raise NutError("upsd sent a line that is not ASCII text") from None
    if not line.isprintable():
        raise NutError(f"upsd sent control characters: {line!r:.80}")
    return line


def check_error(words: list[str]) -> None:
    """Raise NutError for an ``ERR`` reply (``ERR UNKNOWN-UPS`` etc.)."""
    if words and words[0] == "ERR":
        code = words[1] if len(words) > 1 else "(no code)"
        hint = {
            "UNKNOWN-UPS": ": check power.nut_ups against ups.conf",
            "ACCESS-DENIED": ": allow this host in upsd.conf",
            "DATA-STALE": ": the driver lost the UPS (cable, driver down)",
            "DRIVER-NOT-CONNECTED": ": start the UPS driver (upsdrvctl start)",
        }.get(code, "")
        raise NutError(f"upsd answered ERR {code:.40}{hint}")


def parse_var_line(words: list[str], ups: str) -> tuple[str, str]:
    """``VAR <ups> <name> "<value>"`` -> (name, value), validated."""
    if len(words) != 4 or words[0] != "VAR" or words[1] != ups:
        raise NutError(
            f"upsd sent an unexpected line in the list of {ups}: {' '.join(words)!r:.80}"
        )
    name, value = words[2], words[3]
    if not _VAR_NAME.fullmatch(name):
        raise NutError(f"upsd sent a malformed variable name {name!r:.70}")
    if len(value) > MAX_VALUE_LEN:
        raise NutError(f"upsd sent a value of {name} longer than {MAX_VALUE_LEN} characters")
    return name, value


class NutClient:
    """Reads one UPS's variables from upsd. One short connection per read."""

    def __init__(self, host: str, port: int, ups: str, *, timeout_s: float = 5.0) -> None:
        if not 0 < port < 65536:
            raise NutError(f"upsd port {port} must be between 1 and 65535")
        if timeout_s <= 0:
            raise NutError("the upsd timeout must be positive")
        self.host = host
        self.port = port
        self.ups = validate_ups_name(ups)
        self.timeout_s = timeout_s

    @property
    def where(self) -> str:
        return f"{self.ups}@{self.host}:{self.port}"

    async def async_list_vars(self) -> Mapping[str, str]:
        """Every variable of the UPS (``LIST VAR``); raises NutError on any problem."""
        try:
            return await within(self._list_vars(), self.timeout_s)
        except TimeoutError:
            raise NutError(
                f"upsd at {self.where} did not answer within {self.timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise NutError(f"cannot reach upsd at {self.where}: {exc.strerror or exc}") from None

    async def _list_vars(self) -> dict[str, str]:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_LINE_BYTES)
        try:
            writer.write(f"LIST VAR {self.ups}\n".encode("ascii"))
            await writer.drain()
            first = split_words(await self._line(reader))
            check_error(first)
            if first != ["BEGIN", "LIST", "VAR", self.ups]:
                raise NutError(f"upsd at {self.where} answered {' '.join(first)!r:.80} to LIST VAR")
            values: dict[str, str] = {}
            while True:
                words = split_words(await self._line(reader))
                check_error(words)
                if words == ["END", "LIST", "VAR", self.ups]:
                    return values
                if len(values) >= MAX_VARS:
                    raise NutError(f"upsd at {self.where} listed more than {MAX_VARS} variables")
                name, value = parse_var_line(words, self.ups)
                values[name] = value
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(b"LOGOUT\n")
            writer.close()
            with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
                await writer.wait_closed()

    async def _line(self, reader: asyncio.StreamReader) -> str:
        try:
            raw = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise NutError(
                f"upsd at {self.where} sent a line longer than {MAX_LINE_BYTES} bytes"
            ) from None
        except asyncio.IncompleteReadError:
            raise NutError(f"upsd at {self.where} closed the connection mid-answer") from None
        return decode_line(raw)
