"""The rack passport: a one-page black-and-white PDF with the rack's facts and QR codes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from meshcloud.images.passport import PassportInfo, render_passport

INFO = PassportInfo(
    rack="rack-2",
    site="north",
    cluster="relief",
    cluster_id="0b9e3c5e-6a57-4c3e-9a55-2d1b0b6f1a11",
    console_url="https://10.44.0.12:8440/",
    image_sha256="ab" * 32,
    flashed_at="2026-11-22 06:00 UTC",
    device="/dev/sdb",
    ca_sha256="cd" * 32,
)


def test_passport_is_one_printable_page_with_the_facts(tmp_path: Path) -> None:
    if shutil.which("pdftoppm") is None or shutil.which("pdftotext") is None:
        pytest.skip("needs poppler-utils")
    pdf = render_passport(INFO, tmp_path / "rack-2.pdf")
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert text.count("\f") == 1  # one page
    for fact in ("rack-2", "site north", "cluster relief", INFO.cluster_id, INFO.console_url,
                 "ab" * 16, "/dev/sdb", "meshcloud:" + INFO.cluster_id + "/rack-2", "RACK ID", "CONSOLE"):  # fmt: skip
        assert fact in text, fact
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-singlefile", str(pdf), str(tmp_path / "p")],
                   check=True)  # fmt: skip
    page = Image.open(tmp_path / "p.png").convert("RGB")
    colours = page.getcolors(maxcolors=1 << 16) or []
    # black and white only (anti-aliasing adds greys, never a colour)
    assert all(r == g == b for _count, (r, g, b) in colours)
    dark = sum(count for count, (r, _g, _b) in colours if r < 128)
    assert dark > 0.03 * page.width * page.height  # QR codes and text are really there


def test_qr_codes_decode_to_the_rack_id_and_the_console(tmp_path: Path) -> None:
    if shutil.which("zbarimg") is None or shutil.which("pdftoppm") is None:
        pytest.skip("needs zbar-tools and poppler-utils")
    pdf = render_passport(INFO, tmp_path / "rack-2.pdf")
    subprocess.run(["pdftoppm", "-png", "-r", "150", "-singlefile", str(pdf), str(tmp_path / "p")],
                   check=True)  # fmt: skip
    decoded = subprocess.run(["zbarimg", "-q", "--raw", str(tmp_path / "p.png")],
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    assert sorted(decoded) == sorted([INFO.rack_id, INFO.console_url])


def test_same_input_gives_the_same_pdf(tmp_path: Path) -> None:
    a = render_passport(INFO, tmp_path / "a.pdf").read_bytes()
    b = render_passport(INFO, tmp_path / "b.pdf").read_bytes()
    assert a == b
