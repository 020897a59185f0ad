"""report.md -> a self-contained report.html: every image inlined as a base64 data URI.

The reports are written as Markdown first (readable in a terminal, diffable, rendered by any
forge), then rendered here by markdown-it-py (CommonMark plus pipe tables). Raw HTML in the
Markdown is escaped, not passed through, and every image is replaced by a data URI of the file
it names (relative to the report), so the page loads nothing from anywhere: no scripts, no web
fonts, no remote images, CSS inline. A missing or remote image becomes its alt text, marked.

Usage:
    write_html(Path("runs/x/report.md"))        # -> runs/x/report.html
    html = markdown_to_html(md_text, base_dir=Path("runs/x"), title="run x")
    card = markdown_fragment(md_text, base_dir=Path("runs/x"))  # no page, no CSS
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from markdown_it import MarkdownIt

from transferlab.io import write_atomic

MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".gif": "image/gif",
}

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


def data_uri(path: Path) -> str | None:
    """``data:<mime>;base64,...`` of an image file, or None if missing or of an unknown type."""
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return None
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _renderer(base_dir: Path):
    """markdown-it with pipe tables, no raw HTML, and images inlined from ``base_dir``."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(self, tokens, idx, options, env):  # markdown-it binds rules as methods
        token = tokens[idx]
        src, alt = token.attrGet("src") or "", token.content
        uri = None if "://" in src else data_uri(base_dir / src)
        if uri is None:
            return f'<span class="missing">[image not found: {html.escape(src)}]</span>'
        return f'<img src="{uri}" alt="{html.escape(alt)}">'

    md.add_render_rule("image", image)
    return md


def markdown_fragment(md: str, base_dir: Path) -> str:
    """Markdown as an HTML fragment (no page, no style: a notebook cell's output)."""
    return _renderer(base_dir).render(md)


def markdown_to_html(md: str, base_dir: Path, title: str) -> str:
    """Convert report Markdown to a complete, self-contained HTML page."""
    body = _renderer(base_dir).render(md)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + body
        + "\n</body></html>\n"
    )


def write_html(md_path: Path, title: str | None = None) -> Path:
    """Write ``report.html`` beside ``md_path`` (images resolved relative to it)."""
    md = md_path.read_text()
    first = next(
        (ln[2:].strip() for ln in md.splitlines() if ln.startswith("# ")), md_path.parent.name
    )
    out = md_path.with_suffix(".html")
    return write_atomic(out, markdown_to_html(md, md_path.parent, title or first))
