"""The rack passport: one printable black-and-white A4 page per flashed rack.

It travels taped to the rack: who the rack is (name, site, cluster), what
it runs (the image's SHA-256), how to reach its console, and two QR codes
(the rack id and the console address). It holds no secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reportlab.graphics import renderPDF
from reportlab.graphics.barcode.qr import QrCodeWidget
from reportlab.graphics.shapes import Drawing
from reportlab.lib.colors import black
from reportlab.lib.pagesizes import A4
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas

from meshcloud.core.names import validate_name


@dataclass(frozen=True)
class PassportInfo:
    rack: str
    site: str
    cluster: str
    cluster_id: str
    console_url: str
    image_sha256: str
    flashed_at: str
    device: str
    ca_sha256: str

    @property
    def rack_id(self) -> str:
        """What the rack-id QR code says: the cluster id and the rack name."""
        return f"meshcloud:{self.cluster_id}/{self.rack}"


def _qr(canvas: Canvas, text: str, x: float, y: float, size: float, label: str, align: str) -> None:
    """A QR code of ``text`` at (x, y), with its label and text below, aligned left or right."""
    widget = QrCodeWidget(text, barLevel="M", barFillColor=black, barStrokeColor=black)
    x0, y0, x1, y1 = widget.getBounds()
    drawing = Drawing(size, size, transform=[size / (x1 - x0), 0, 0, size / (y1 - y0), 0, 0])
    drawing.add(widget)
    renderPDF.draw(drawing, canvas, x, y)
    draw = canvas.drawString if align == "left" else canvas.drawRightString
    anchor = x if align == "left" else x + size
    canvas.setFont("Helvetica-Bold", 10)
    draw(anchor, y - 5 * mm, label)
    canvas.setFont("Courier", 8)
    draw(anchor, y - 9 * mm, text)


def render_passport(info: PassportInfo, out: Path) -> Path:
    """Write the passport PDF to ``out`` and return it."""
    validate_name("rack", info.rack)
    width, height = A4
    c = Canvas(str(out), pagesize=A4, invariant=True)
    c.setTitle(f"meshcloud rack passport: {info.rack}")
    c.setAuthor("meshcloud")
    c.setFillColor(black)
    c.setStrokeColor(black)
    left, right = 20 * mm, width - 20 * mm

    c.setLineWidth(2)
    c.rect(left - 5 * mm, 15 * mm, right - left + 10 * mm, height - 30 * mm)
    c.setFont("Helvetica", 12)
    c.drawString(left, height - 30 * mm, "MESHCLOUD RACK PASSPORT")
    c.setFont("Helvetica-Bold", 44)
    c.drawString(left, height - 50 * mm, info.rack)
    c.setFont("Helvetica", 16)
    c.drawString(left, height - 60 * mm, f"site {info.site}   ·   cluster {info.cluster}")
    c.setLineWidth(1)
    c.line(left, height - 66 * mm, right, height - 66 * mm)

    rows = [
        ("Console", info.console_url),
        ("Cluster id", info.cluster_id),
        ("Image SHA-256", info.image_sha256[:32]),
        ("", info.image_sha256[32:]),
        ("Flashed", f"{info.flashed_at} on {info.device}"),
        ("Cluster CA SHA-256", info.ca_sha256[:32]),
        ("", info.ca_sha256[32:]),
    ]
    y = height - 78 * mm
    for label, value in rows:
        c.setFont("Helvetica-Bold", 11)
        c.drawString(left, y, label)
        c.setFont("Courier-Bold" if label == "Console" else "Courier", 11)
        c.drawString(left + 45 * mm, y, value)
        y -= 7 * mm

    qr_size = 60 * mm
    qr_y = y - qr_size - 6 * mm
    _qr(c, info.rack_id, left, qr_y, qr_size, "RACK ID", "left")
    _qr(c, info.console_url, right - qr_size, qr_y, qr_size, "CONSOLE", "right")

    c.setFillColor(black)
    steps = [
        "In the field:",
        "1. Put the rack on power and connect its mesh link. No keyboard or screen is needed.",
        "2. Switch it on. It finds the other racks of its cluster by itself.",
        f"3. From a laptop on the mesh, open {info.console_url}",
        "   (or scan the console QR code) and log in with the kit's admin login.",
        "4. If the console does not answer after 10 minutes, see the field guide, section 'A rack",
        "   does not come up'. This sheet holds no password or key.",
    ]
    y = qr_y - 18 * mm
    for i, line in enumerate(steps):
        c.setFont("Helvetica-Bold" if i == 0 else "Helvetica", 11)
        c.drawString(left, y, line)
        y -= 6 * mm
    c.showPage()
    c.save()
    return out
