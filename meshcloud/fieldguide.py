"""The field guide: Markdown pages in field-guide/LANG/ built into printable PDFs.

``python -m meshcloud.fieldguide build`` (what ``make field-guide`` runs)
renders each language's pages, in the order of ``field-guide/pages.txt``,
to one HTML document with markdown-it-py, and prints it to a black-and-white
A4 PDF with Debian's ``weasyprint``: ``meshcloud-field-guide-LANG.pdf`` and
the one-page ``meshcloud-quick-card-LANG.pdf``, in ``field-guide/build/``.
Figures: the SVG drawings in ``field-guide/figures/``, the console's status
icons (taken from its page, drawn in black) and the console screenshots of
``docs/console/`` turned to grey.

It also says which statuses the console shows (:func:`console_statuses`),
read from the console's own JavaScript and message catalogs, so that a test
can check that the guide names each of them.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshcloud.errors import MeshcloudError

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "field-guide"
STATIC = Path(__file__).resolve().parent / "web" / "static"
SCREENSHOTS = ROOT / "docs" / "console"
LANGUAGES = ("en", "fr")
QUICK_CARD = "quick-card"
TITLES = {
    "en": ("meshcloud field guide", "Contents", "Quick reference card"),
    "fr": ("Guide de terrain meshcloud", "Sommaire", "Fiche de référence rapide"),
}


class FieldGuideError(MeshcloudError):
    """The field guide cannot be built (a page, a figure or a tool is missing)."""


# -- what the console shows ----------------------------------------------------------


@dataclass(frozen=True)
class ConsoleStatus:
    """One status text of the console: its catalog key and its text per language."""

    key: str
    texts: Mapping[str, str]

    def pattern(self, lang: str) -> re.Pattern[str]:
        """The text as a pattern over normalised prose: a {placeholder} matches one or two words."""
        parts = re.split(r"\{\w+\}", normalise(self.texts[lang]))
        body = r"\S+(?:\s\S+)?".join(re.escape(p) for p in parts)
        return re.compile(body, re.IGNORECASE)


def normalise(text: str) -> str:
    """Prose for matching: no Markdown emphasis or code marks, plain quotes and spaces."""
    text = text.replace("\u2019", "'").replace("\u00a0", " ").replace("\u202f", " ")
    text = re.sub(r"\*\*|`", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _balanced(source: str, start: int) -> str:
    """The text between the bracket at ``start`` and its matching closing bracket."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = [pairs[source[start]]]
    i = start + 1
    quote = ""
    while i < len(source) and stack:
        c = source[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in pairs:
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        i += 1
    return source[start + 1 : i - 1]


def _top_level_args(inside: str) -> list[str]:
    """Split a call's argument text at its top-level commas."""
    args, depth, current, quote = [], 0, "", ""
    for c in inside:
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(current)
            current = ""
            continue
        current += c
    return [*args, current]


# Where the console puts a status (the JS that maps states to words):
#   [level, words] = ["bad", t("rack_lost")]          a rack's or an appliance's status
#   badge(level, t("conn_lost"))                      any badge's words (t(`sev_${x}`) too)
#   items.push({ level: "bad", text: t("att_...") })  the "needs attention" list
#   const headline = ... t("all_well")                the overview's summary
#   field(t("state"), ... t(`state_${a.state}`))      a card's State or Power line
#   `[${t(`level_${i.level}`)}] ...`                  a printed report's level tags
# Within each, t("key") names one status, t(`prefix_${...}`) every key with that prefix.
_STATUS_SITES = (
    re.compile(r"\[level, words\] = (\[)"),
    re.compile(r"\bbadge(\()"),
    re.compile(r"items\.push(\()\{ level:"),
    re.compile(r"const headline = ([^;]*);"),
    re.compile(r"\bfield(\()t\(\"(?:state|power)\"\)"),
    re.compile(r"\[\$\{(t\(`\w+_\$\{[^}]*\}`\))\}\]"),
)
_KEY = re.compile(r"\b(tn?)\(\"(\w+)\"")
_FAMILY = re.compile(r"\bt\(`(\w+_)\$\{")  # t(`sev_${e.severity}`): every sev_* key


def _status_spans(source: str) -> list[str]:
    spans: list[str] = []
    for site in _STATUS_SITES:
        for m in site.finditer(source):
            if source[m.start(1)] not in "([":
                spans.append(m.group(1))  # the site's pattern captured the span itself
                continue
            inside = _balanced(source, m.start(1))
            args = _top_level_args(inside)
            if site.pattern.startswith(r"\bbadge") or site.pattern.startswith(r"\bfield"):
                inside = ",".join(args[1:])  # the words, not the level or the label
            spans.append(inside)
    return spans


def console_status_keys(js_sources: Iterable[str], catalog: Mapping[str, str]) -> list[str]:
    """The catalog keys of every status the console's JavaScript can show, sorted."""
    keys: set[str] = set()
    for source in js_sources:
        for span in _status_spans(source):
            for fn, key in _KEY.findall(span):
                keys.update([f"{key}_one", f"{key}_other"] if fn == "tn" else [key])
            for prefix in _FAMILY.findall(span):
                family = [k for k in catalog if k.startswith(prefix)]
                if not family:
                    raise FieldGuideError(f"the console shows {prefix}* but its catalog has none")
                keys.update(family)
    unknown = sorted(k for k in keys if k not in catalog)
    if unknown:
        raise FieldGuideError(f"the console uses status keys missing from its catalog: {unknown}")
    return sorted(keys)


def console_catalogs(static: Path = STATIC) -> dict[str, dict[str, str]]:
    """The console's message catalogs by language code."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted((static / "i18n").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        out[path.stem] = {k: v for k, v in doc.items() if isinstance(v, str)}
    return out


def console_statuses(static: Path = STATIC) -> list[ConsoleStatus]:
    """Every status the console shows, with its text in each language of the guide."""
    catalogs = console_catalogs(static)
    sources = [p.read_text(encoding="utf-8") for p in sorted(static.glob("*.js"))]
    keys = console_status_keys(sources, catalogs["en"])
    return [
        ConsoleStatus(
            key, {lang: catalogs[lang].get(key, catalogs["en"][key]) for lang in LANGUAGES}
        )
        for key in keys
    ]


def icon_levels(static: Path = STATIC) -> dict[str, str]:
    """The console's status icons (level -> SVG body) from the sprite in its page."""
    page = (static / "index.html").read_text(encoding="utf-8")
    return dict(re.findall(r'<symbol id="i-(\w+)" viewBox="0 0 16 16">(.*?)</symbol>', page))


def missing_statuses(guide_text: str, statuses: Sequence[ConsoleStatus], lang: str) -> list[str]:
    """The statuses whose text (in ``lang``) the guide text does not contain."""
    prose = normalise(guide_text)
    return [s.key for s in statuses if not s.pattern(lang).search(prose)]


# -- pages ---------------------------------------------------------------------------


def page_names(guide: Path = GUIDE) -> list[str]:
    """The guide's pages in print order (field-guide/pages.txt)."""
    lines = (guide / "pages.txt").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def page_title(markdown: str) -> str:
    """A page's first level-1 heading."""
    m = re.search(r"^# (.+)$", markdown, re.MULTILINE)
    if not m:
        raise FieldGuideError("a field guide page must start with a '# Title' line")
    return m.group(1).strip()


def guide_sources(lang: str, guide: Path = GUIDE) -> list[tuple[str, str]]:
    """(name, Markdown) of each page of ``lang`` in order; every page must exist, none extra."""
    names = page_names(guide)
    folder = guide / lang
    present = {p.stem for p in folder.glob("*.md")} - {QUICK_CARD}
    extra = sorted(present - set(names))
    missing = [n for n in names if n not in present]
    if missing or extra:
        raise FieldGuideError(
            f"field-guide/{lang}: pages missing {missing}, pages not in pages.txt {extra}"
        )
    return [(n, (folder / f"{n}.md").read_text(encoding="utf-8")) for n in names]


def _markdown_to_html(markdown: str) -> str:
    from markdown_it import MarkdownIt

    rendered: str = MarkdownIt("commonmark").enable("table").render(markdown)
    return rendered


def figures_in(markdown: str) -> list[str]:
    """The figures a page shows (``![...](figures/NAME)``)."""
    return re.findall(r"!\[[^\]]*\]\(figures/([\w.-]+)\)", markdown)


def render_guide_html(lang: str, guide: Path = GUIDE) -> str:
    """The whole guide of ``lang`` as one HTML document (cover, contents, one section per page)."""
    title, contents, _ = TITLES[lang]
    pages = guide_sources(lang, guide)
    toc = "".join(
        f'<li><a href="#p-{name}">{html.escape(page_title(md))}</a></li>' for name, md in pages
    )
    body = "".join(
        f'<section class="page" id="p-{name}">{_markdown_to_html(md)}</section>'
        for name, md in pages
    )
    cover = (
        f'<section class="cover"><p class="brand">meshcloud</p><h1 class="title">{title}</h1>'
        f'<h2 class="toc-title">{contents}</h2><ol class="toc">{toc}</ol></section>'
    )
    return _document(lang, title, cover + body, "guide")


def render_card_html(lang: str, guide: Path = GUIDE) -> str:
    """The quick reference card of ``lang`` as an HTML document."""
    markdown = (guide / lang / f"{QUICK_CARD}.md").read_text(encoding="utf-8")
    return _document(lang, page_title(markdown), _markdown_to_html(markdown), "card")


def _document(lang: str, title: str, body: str, kind: str) -> str:
    return (
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="style.css"></head>'
        f'<body class="{kind}">{body}</body></html>'
    )


# -- figures -------------------------------------------------------------------------


def icon_svg(body: str) -> str:
    """A console icon as a standalone black SVG (white strokes stay white)."""
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16" width="16" height="16">'
        f'<g color="#000" fill="#000">{body.replace("currentColor", "#000")}</g></svg>'
    )


def grey_copy(source: Path, target: Path) -> None:
    """A screenshot in shades of grey, for a black-and-white print."""
    from PIL import Image

    with Image.open(source) as image:
        image.convert("L").save(target, optimize=True)


def prepare_figures(out: Path, wanted: Iterable[str], guide: Path = GUIDE) -> None:
    """Put every wanted figure in ``out/figures``: drawings, console icons, grey screenshots."""
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    icons = icon_levels()
    for name in sorted(set(wanted)):
        target = figures / name
        drawing = guide / "figures" / name
        icon = re.fullmatch(r"icon-(\w+)\.svg", name)
        if drawing.exists():
            shutil.copyfile(drawing, target)
        elif icon and icon.group(1) in icons:
            target.write_text(icon_svg(icons[icon.group(1)]), encoding="utf-8")
        elif (SCREENSHOTS / name).exists():
            if not target.exists() or target.stat().st_mtime < (SCREENSHOTS / name).stat().st_mtime:
                grey_copy(SCREENSHOTS / name, target)
        else:
            raise FieldGuideError(
                f"figure {name!r}: not in field-guide/figures, not a console icon"
                f" ({', '.join(sorted(icons))}), not a screenshot in docs/console"
            )


# -- build ---------------------------------------------------------------------------


def weasyprint_argv(html_path: Path, pdf_path: Path) -> list[str]:
    """The command that prints one HTML file to PDF (relative links resolve beside it)."""
    return [
        "weasyprint",
        "--quiet",
        "--base-url",
        str(html_path.parent),
        str(html_path),
        str(pdf_path),
    ]


def _run(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise FieldGuideError(
            f"{argv[0]} not found: install Debian's {argv[0]} package (scripts/debian-packages.txt)"
        )
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FieldGuideError(f"{' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")


def output_names(lang: str) -> tuple[str, str]:
    """The guide's and the quick card's PDF file names for ``lang``."""
    return f"meshcloud-field-guide-{lang}.pdf", f"meshcloud-quick-card-{lang}.pdf"


def build(out: Path, languages: Sequence[str] = LANGUAGES, guide: Path = GUIDE) -> list[Path]:
    """Build the guide and the quick card of each language into ``out``; return the PDFs."""
    out.mkdir(parents=True, exist_ok=True)
    wanted: list[str] = []
    for lang in languages:
        for _, md in guide_sources(lang, guide):
            wanted += figures_in(md)
        wanted += figures_in((guide / lang / f"{QUICK_CARD}.md").read_text(encoding="utf-8"))
    prepare_figures(out, wanted, guide)
    shutil.copyfile(guide / "style.css", out / "style.css")
    made = []
    for lang in languages:
        guide_pdf, card_pdf = output_names(lang)
        for text, pdf in (
            (render_guide_html(lang, guide), guide_pdf),
            (render_card_html(lang, guide), card_pdf),
        ):
            page = out / pdf.replace(".pdf", ".html")
            page.write_text(text, encoding="utf-8")
            _run(weasyprint_argv(page, out / pdf))
            made.append(out / pdf)
    return made


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcloud.fieldguide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the PDFs (what `make field-guide` runs)")
    b.add_argument("--out", type=Path, default=GUIDE / "build")
    b.add_argument("--lang", action="append", choices=LANGUAGES, help="only this language")
    sub.add_parser("statuses", help="list the console statuses the guide must name")
    args = parser.parse_args(argv)
    try:
        if args.command == "statuses":
            for status in console_statuses():
                print(f"{status.key}: " + " | ".join(status.texts[lang] for lang in LANGUAGES))
            return 0
        for pdf in build(args.out, args.lang or LANGUAGES):
            print(pdf)
    except FieldGuideError as e:
        print(f"field guide: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
