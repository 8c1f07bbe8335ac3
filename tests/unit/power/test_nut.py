"""The upsd client against a fake upsd on loopback: good answers, errors, garbage, floods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from meshcloud.core.power import PowerSource
from meshcloud.power.nut import (
    MAX_LINE_BYTES,
    MAX_VARS,
    NutClient,
    NutError,
    split_words,
    validate_ups_name,
)
from meshcloud.power.source import MainsSource, NutSource, reading_from_vars

Script = Callable[[str], bytes]


def listing(ups: str, variables: dict[str, str]) -> bytes:
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"BEGIN LIST VAR {ups}"]
    lines += [f"VAR {ups} {k} {quote(v)}" for k, v in variables.items()]
    lines.append(f"END LIST VAR {ups}")
    return ("\n".join(lines) + "\n").encode()


@asynccontextmanager
async def fake_upsd(answer: Script | bytes, *, hang: bool = False) -> AsyncIterator[int]:
    """A one-request upsd: reads the first line, writes ``answer`` (or ``answer(line)``)."""
    received: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode()
            received.append(line)
            if hang:
                await asyncio.sleep(3600)
            writer.write(answer(line) if callable(answer) else answer)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


GOOD = {
    "battery.charge": "45",
    "battery.runtime": "540",
    "ups.status": "OB DISCHRG",
    "device.mfr": 'Acme "Power" \\ Co',
}


async def test_lists_the_variables_of_the_ups() -> None:
    def answer(line: str) -> bytes:
        return listing("ups", GOOD) if line == "LIST VAR ups\n" else b"ERR UNKNOWN-COMMAND\n"

    async with fake_upsd(answer) as port:
        vars_ = await NutClient("127.0.0.1", port, "ups", timeout_s=2).async_list_vars()
    assert vars_ == GOOD
    reading = reading_from_vars(vars_)
    assert (reading.on_battery, reading.low_battery) == (True, False)
    assert (reading.charge_pct, reading.runtime_s, reading.status) == (45.0, 540.0, "OB DISCHRG")


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"ERR UNKNOWN-UPS\n", "UNKNOWN-UPS: check power.nut_ups"),
        (b"ERR DATA-STALE\n", "DATA-STALE"),
        (b"BEGIN LIST VAR other\nEND LIST VAR other\n", "answered 'BEGIN LIST VAR other'"),
        (b"BEGIN LIST VAR ups\nVAR ups ups.status OL\n", "closed the connection"),
        (b'BEGIN LIST VAR ups\nVAR ups ups.status "OL\n', "unterminated"),
        (b'BEGIN LIST VAR ups\nVAR ups ups.status "OL"x\n', "right after"),
        (b'BEGIN LIST VAR ups\nVAR ups UPS;STATUS "OL"\n', "malformed variable name"),
        (b'BEGIN LIST VAR ups\nVAR ups ups.status "O\xffL"\n', "not ASCII"),
        (b'BEGIN LIST VAR ups\nVAR ups ups.status "O\x07L"\n', "control characters"),
        (b"BEGIN LIST VAR ups\nRANDOM GARBAGE\n", "unexpected line"),
        (b"BEGIN LIST VAR ups\n", "closed the connection"),
        (b"", "closed the connection"),
        (b"x" * (MAX_LINE_BYTES * 4) + b"\n", f"longer than {MAX_LINE_BYTES}"),
        (b'BEGIN LIST VAR ups\nVAR ups a "' + b"v" * 300 + b'"\n', "longer than 256"),
        (b"x" * (MAX_LINE_BYTES * 4), f"longer than {MAX_LINE_BYTES}|closed"),
    ],
)
async def test_refuses_errors_and_garbage_with_a_sentence(answer: bytes, words: str) -> None:
    async with fake_upsd(answer) as port:
        with pytest.raises(NutError, match=words):
            await NutClient("127.0.0.1", port, "ups", timeout_s=2).async_list_vars()


async def test_refuses_a_flood_of_variables() -> None:
    flood = {f"x.v{i}": "1" for i in range(MAX_VARS + 5)}
    async with fake_upsd(listing("ups", flood)) as port:
        with pytest.raises(NutError, match=f"more than {MAX_VARS} variables"):
            await NutClient("127.0.0.1", port, "ups", timeout_s=5).async_list_vars()


async def test_a_silent_upsd_times_out() -> None:
    async with fake_upsd(b"", hang=True) as port:
        client = NutClient("127.0.0.1", port, "ups", timeout_s=0.3)
        with pytest.raises(NutError, match=r"did not answer within 0\.3 s"):
            await client.async_list_vars()


async def test_unreachable_upsd_is_an_error_reading_not_an_exception() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    source = NutSource(NutClient("127.0.0.1", port, "ups", timeout_s=1))
    reading = await source.async_read()
    assert reading.source is PowerSource.NUT and "cannot reach upsd" in reading.error
    assert source.describe() == f"UPS ups@127.0.0.1:{port}"
    assert (await MainsSource().async_read()).source is PowerSource.MAINS


@pytest.mark.parametrize("name", ["", "-x", "ups name", "ups;rm", "u" * 65, "ups\n"])
def test_ups_names_are_validated(name: str) -> None:
    with pytest.raises(NutError, match="UPS name"):
        validate_ups_name(name)
    with pytest.raises(NutError):
        NutClient("127.0.0.1", 3493, name)


def test_split_words_handles_quotes_and_escapes() -> None:
    assert split_words('VAR ups x "a \\"b\\" \\\\ c"') == ["VAR", "ups", "x", 'a "b" \\ c']
    assert split_words('VAR ups x ""') == ["VAR", "ups", "x", ""]
    for bad in ['VAR "x', 'VAR x"y', "VAR \\", 'VAR "a\\']:
        with pytest.raises(NutError):
            split_words(bad)


@pytest.mark.parametrize(
    ("vars_", "expected"),
    [
        ({"ups.status": "OL CHRG"}, (False, False, None, None, "OL CHRG", "")),
        ({"ups.status": "OB LB", "battery.charge": "8.5", "battery.runtime": "90"},
         (True, True, 8.5, 90.0, "OB LB", "")),
        ({"ups.status": "OB", "battery.charge": "lots", "battery.runtime": "-5"},
         (True, False, None, None, "OB", "")),
        ({"ups.status": "OB", "battery.charge": "250", "battery.runtime": "nan"},
         (True, False, 100.0, None, "OB", "")),
        ({"ups.status": "OL rm-rf FSD " + "X" * 20}, (False, False, None, None, "OL FSD", "")),
        ({"battery.charge": "50"}, (False, False, None, None, "", "no ups.status")),
    ],
)  # fmt: skip
def test_readings_from_variables(vars_: dict[str, str], expected: tuple[object, ...]) -> None:
    r = reading_from_vars(vars_)
    got = (r.on_battery, r.low_battery, r.charge_pct, r.runtime_s, r.status)
    assert got == expected[:5]
    assert (str(expected[5]) in r.error) if expected[5] else not r.error
