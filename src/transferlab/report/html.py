"""report.md -> a self-contained report.html: every image inlined as a base64 data URI.

The reports are written as Markdown first (readable in a terminal, diffable, rendered by any
forge), then converted here. The converter knows only the subset our reports use: headings,
paragraphs, ``-``/``*`` lists, pipe tables, fenced code, images, inline code and bold. The HTML
loads nothing from anywhere: no scripts, no web fonts, no remote images, CSS inline; an image
path that is missing becomes its alt text.

Usage:
    write_html(Path("runs/x/report.md"))        # -> runs/x/report.html
    html = markdown_to_html(md_text, base_dir=Path("runs/x"), title="run x")
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #eff1f3; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 13px; border-radius: 6px; }
pre code { background: none; padding: 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.missing { color: #a40e26; font-style: italic; }
"""

_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def data_uri(path: Path) -> str | None:
    """``data:<mime>;base64,...`` of an image file, or None if it is missing or of an unknown type."""
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return None
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _inline(text: str, base_dir: Path) -> str:
    """Escape, then render images (inlined), local links, `code` and **bold**."""
    out, pos = [], 0
    for m in re.finditer(r"`([^`]+)`", text):  # code spans first: nothing inside them is markup
        out.append(_inline_plain(text[pos:m.start()], base_dir))
        out.append(f"<code>{html.escape(m.group(1))}</code>")
        pos = m.end()
    out.append(_inline_plain(text[pos:], base_dir))
    return "".join(out)


def _inline_plain(text: str, base_dir: Path) -> str:
    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        uri = data_uri(base_dir / src)
        if uri is None:
            return f'<span class="missing">[image not found: {html.escape(src)}]</span>'
        return f'<img alt="{html.escape(alt)}" src="{uri}">'

    parts, pos = [], 0
    for m in _IMAGE.finditer(text):
        parts.append(_text(text[pos:m.start()]))
        parts.append(image(m))
        pos = m.end()
    parts.append(_text(text[pos:]))
    return "".join(parts)


def _text(text: str) -> str:
    s = html.escape(text, quote=False)
    s = _LINK.sub(lambda m: m.group(1) if re.match(r"[a-z]+:", m.group(2)) else
                  f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', s)  # only relative links
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


def markdown_to_html(md: str, base_dir: Path, title: str) -> str:
    """Convert our report Markdown to a complete, self-contained HTML page."""
    lines = md.splitlines()
    body: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            body.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2), base_dir)}</h{n}>")
            i += 1
        elif "|" in line and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1]):
            head = "".join(f"<th>{_inline(c, base_dir)}</th>" for c in _cells(line))
            rows, j = [], i + 2
            while j < len(lines) and "|" in lines[j] and lines[j].strip():
                rows.append("<tr>" + "".join(f"<td>{_inline(c, base_dir)}</td>" for c in _cells(lines[j])) + "</tr>")
                j += 1
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
            i = j
        elif re.match(r"^\s*[-*]\s+", line):
            items, j = [], i
            while j < len(lines) and re.match(r"^\s*[-*]\s+", lines[j]):
                items.append("<li>" + _inline(re.sub(r"^\s*[-*]\s+", "", lines[j]), base_dir) + "</li>")
                j += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            i = j
        else:
            para, j = [], i
            while j < len(lines) and lines[j].strip() and not re.match(r"^(#{1,6}\s|```|\s*[-*]\s+)", lines[j]):
                if "|" in lines[j] and j + 1 < len(lines) and _TABLE_SEP.match(lines[j + 1]):
                    break
                para.append(lines[j])
                j += 1
            body.append("<p>" + _inline(" ".join(para), base_dir) + "</p>")
            i = j
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html(md_path: Path, title: str | None = None) -> Path:
    """Write ``report.html`` beside ``md_path`` (images resolved relative to it)."""
    md = md_path.read_text()
    first = next((ln[2:].strip() for ln in md.splitlines() if ln.startswith("# ")), md_path.parent.name)
    out = md_path.with_suffix(".html")
    out.write_text(markdown_to_html(md, md_path.parent, title or first))
    return out
