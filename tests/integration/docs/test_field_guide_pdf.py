"""`make field-guide` builds both languages' PDFs, and every page of them renders.

Runs the builder that `make field-guide` runs (``python -m meshcloud.fieldguide
build``) into a temporary directory, then reads the PDFs back with poppler's
pdfinfo and pdftotext: every PDF page has text, each source page's title is in
the guide in print order, the quick card is one page, and the printed guide
still names every console status.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshcloud import fieldguide as fg

pytestmark = pytest.mark.slow


def page_count(pdf: Path) -> int:
    out = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True)
    return int(re.search(r"^Pages:\s+(\d+)", out.stdout, re.MULTILINE).group(1))


def page_texts(pdf: Path) -> list[str]:
    out = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True)
    return out.stdout.split("\f")[: page_count(pdf)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("weasyprint", "pdfinfo", "pdftotext"):
        assert shutil.which(tool), f"{tool} missing: run make bootstrap"
    out = tmp_path_factory.mktemp("field-guide")
    done = subprocess.run(
        [sys.executable, "-m", "meshcloud.fieldguide", "build", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("lang", fg.LANGUAGES)
def test_both_pdfs_are_built_and_every_page_renders(built: Path, lang: str) -> None:
    guide_pdf, card_pdf = (built / name for name in fg.output_names(lang))
    pages = fg.guide_sources(lang)
    texts = page_texts(guide_pdf)
    assert len(texts) >= len(pages) + 1  # the cover, then at least one page each
    for number, text in enumerate(texts, 1):
        assert text.strip(), f"{guide_pdf.name}: page {number} is blank"
    # each source page starts a printed page with its title, in order
    flat = [fg.normalise(t) for t in texts]
    last = 0  # the cover (page 1) lists every title: look from page 2 on
    for name, md in pages:
        title = fg.normalise(fg.page_title(md))
        found = [i for i in range(last + 1, len(flat)) if title in flat[i]]
        assert found, f"{guide_pdf.name}: page {name!r} ({title!r}) not found after page {last + 1}"
        last = found[0]
    assert page_count(card_pdf) == 1
    card = fg.normalise(page_texts(card_pdf)[0])
    assert fg.normalise(fg.page_title((fg.GUIDE / lang / "quick-card.md").read_text())) in card


@pytest.mark.parametrize("lang", fg.LANGUAGES)
def test_the_printed_guide_names_every_console_status(built: Path, lang: str) -> None:
    text = " ".join(page_texts(built / fg.output_names(lang)[0]))
    assert not fg.missing_statuses(text, fg.console_statuses(), lang)
