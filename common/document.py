"""Report documents: a list of blocks (headings, paragraphs, tables, plots, image galleries) and
its two renderings, a self-contained HTML page and Markdown.

Every report medfed writes is built from these blocks, so its HTML and Markdown cannot drift
apart and there is one Markdown writer. Plots are drawn with matplotlib's Agg canvas under a fixed
style and embedded as base64 PNG; the HTML needs no network, no JavaScript and no file beside it.
The same blocks always render to the same bytes.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

DPI = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Fixed style so the PNG bytes do not depend on a user's matplotlibrc; parse_math is off because a
# site or class name containing "$" would otherwise be parsed (or fail) as a formula.
STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "text.parse_math": False,
    "axes.grid": False, "lines.linewidth": 1.5, "image.cmap": "Blues",
}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1b1f24;
max-width:1150px;margin:0 auto;padding:1.5rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.4rem}h2{font-size:1.25rem;margin-top:2.2rem;
border-bottom:2px solid #d0d7de;padding-bottom:.2rem}h3{font-size:1.05rem;margin-top:1.4rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.85rem}
caption{text-align:left;font-weight:600;padding:.2rem 0}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left;vertical-align:top}
thead th{background:#f3f5f7}tbody tr:nth-child(even){background:#fafbfc}
figure{margin:.8rem 0}figure img{max-width:100%;height:auto}
figcaption{font-size:.85rem;color:#444}ul{padding-left:1.3rem}
.gallery{display:flex;flex-wrap:wrap;gap:1rem}.gallery figure{margin:0;max-width:100%}
.gallery figcaption{max-width:30rem}.note{color:#6a4b00;font-size:.85rem}
details{margin:.5rem 0;border:1px solid #d0d7de;border-radius:4px;padding:.3rem .6rem}
summary{cursor:pointer;font-weight:600}
"""


# --- blocks --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Items:
    """A bulleted list; an item given as (lead, text) shows its lead in bold."""
    items: tuple[str | tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str | None = None


@dataclass(frozen=True)
class Plot:
    """A matplotlib figure; Markdown shows `fallback` (tables of the same numbers) or a note."""
    name: str
    caption: str
    draw: Callable[[], Figure]
    fallback: tuple[Table, ...] = ()


@dataclass(frozen=True)
class Picture:
    file: str
    caption: str


@dataclass(frozen=True)
class Gallery:
    title: str
    pictures: tuple[Picture, ...]


@dataclass(frozen=True)
class Folded:
    """Detail a reader opens when they want it (HTML `<details>`); Markdown shows it all."""
    summary: str
    blocks: tuple


Block = Heading | Paragraph | Items | Table | Plot | Gallery | Folded


def png(draw: Callable[[], Figure]) -> bytes:
    """A plot's figure as PNG bytes, drawn under the fixed style."""
    with matplotlib.rc_context(STYLE):
        figure = draw()
        buffer = io.BytesIO()
        # No "Software" entry: it carries the matplotlib version, and the bytes must be stable.
        figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


# --- HTML ----------------------------------------------------------------------------------------

def html_page(title: str, blocks: list[Block], *, run_dir: Path) -> str:
    """The blocks as one HTML page; gallery pictures are read from `run_dir` and embedded."""
    body = "\n".join(_html_block(block, run_dir=Path(run_dir)) for block in blocks)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    )


def _html_block(block: Block, *, run_dir: Path) -> str:
    escape = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{_html_item(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Plot):
        return _html_figure(png(block.draw), block.caption)
    if isinstance(block, Folded):
        inner = "\n".join(_html_block(b, run_dir=run_dir) for b in block.blocks)
        return f"<details><summary>{escape(block.summary)}</summary>\n{inner}\n</details>"
    return _html_gallery(block, run_dir=run_dir)


def _html_item(item: str | tuple[str, str]) -> str:
    if isinstance(item, str):
        return html.escape(item)
    lead, text = item
    return f"<strong>{html.escape(lead)}</strong> {html.escape(text)}"


def _html_table(table: Table) -> str:
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in table.rows)
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_figure(data: bytes, caption: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    text = html.escape(caption)
    return (f"<figure><img src=\"data:image/png;base64,{encoded}\" alt=\"{text}\">"
            f"<figcaption>{text}</figcaption></figure>")


def _html_gallery(gallery: Gallery, *, run_dir: Path) -> str:
    items = []
    for picture in gallery.pictures:
        data, problem = _read_png(run_dir, picture.file)
        if data is None:
            note = html.escape(f"{picture.caption} — image {picture.file} {problem}")
            items.append(f"<figure><p class=\"note\">{note}</p></figure>")
        else:
            items.append(_html_figure(data, picture.caption))
    return (f"<h3>{html.escape(gallery.title)}</h3>"
            f"<div class=\"gallery\">{''.join(items)}</div>")


def _read_png(run_dir: Path, file: str) -> tuple[bytes | None, str]:
    """The PNG bytes, or None and why not. Only files inside run_dir are read, so a report
    cannot make the page embed an arbitrary file from the machine."""
    root = run_dir.resolve()
    path = (root / file).resolve()
    if not file or not path.is_relative_to(root):
        return None, "is outside the run directory"
    if not path.is_file():
        return None, "is missing"
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return None, "is not a PNG file"
    return data, ""


# --- Markdown ------------------------------------------------------------------------------------

def markdown_page(blocks: list[Block]) -> str:
    """The blocks as Markdown: the same text and numbers, plots replaced by tables or notes."""
    return "\n\n".join(markdown_block(block) for block in blocks) + "\n"


def markdown_block(block: Block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + _md_text(block.text)
    if isinstance(block, Paragraph):
        return _md_text(block.text)
    if isinstance(block, Items):
        return "\n".join(f"- {_md_item(item)}" for item in block.items)
    if isinstance(block, Table):
        return _markdown_table(block)
    if isinstance(block, Plot):
        note = f"*Plot: {_md_text(block.caption)} (shown in report.html).*"
        return "\n\n".join([note, *(_markdown_table(t) for t in block.fallback)])
    if isinstance(block, Folded):
        return "\n\n".join(markdown_block(b) for b in block.blocks)
    lines = [f"**{_md_text(block.title)}**", ""]
    lines += [f"- {_md_text(p.caption)} (image file {_md_text(p.file)})" for p in block.pictures]
    return "\n".join(lines)


def _md_item(item: str | tuple[str, str]) -> str:
    if isinstance(item, str):
        return _md_text(item)
    lead, text = item
    return f"**{_md_text(lead)}** {_md_text(text)}"


def _md_text(text: str) -> str:
    # Markdown viewers render raw HTML and inline markup, so report strings are neutralised.
    escaped = html.escape(" ".join(str(text).split()), quote=False)
    for mark in ("\\", "`", "*", "_", "[", "]", "|"):
        escaped = escaped.replace(mark, "\\" + mark)
    return escaped


def _markdown_table(table: Table) -> str:
    lines = [f"**{_md_text(table.caption)}**", ""] if table.caption else []
    lines.append("| " + " | ".join(_md_text(c) for c in table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)
