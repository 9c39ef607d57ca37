"""report.html: one self-contained file (no external CSS, scripts or images; the charts are
base64 PNGs), its tables rendered from report.md so the page and the markdown can never
show different numbers."""
from __future__ import annotations

import base64
import html
import re

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 2px solid #1f77b4; } h2 { margin-top: 1.6em; color: #1f4e79; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; max-width: 28em; overflow-wrap: break-word; }
th { background: #eef3f8; } .wide { overflow-x: auto; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 3px; } img { max-width: 100%; border: 1px solid #ddd; }
.meta { color: #666; font-size: 13px; }
"""


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** spans of report.md."""
    out = html.escape(text)
    out = re.sub(r"`([^`]*)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    """A table row's cells; "\\|" is a pipe inside a cell (GFM)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def _table(lines: list[str]) -> str:
    """A markdown table (header, alignment row, rows) as HTML; right-aligned columns get class num."""
    head, align, rows = _cells(lines[0]), _cells(lines[1]), [_cells(r) for r in lines[2:]]
    right = [a.endswith(":") for a in align]
    out = ['<div class="wide"><table>', "<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        tds = "".join(f'<td class="num">{_inline(c)}</td>' if i < len(right) and right[i] else f"<td>{_inline(c)}</td>"
                      for i, c in enumerate(r))
        out.append(f"<tr>{tds}</tr>")
    return "\n".join(out + ["</table></div>"])


def markdown_to_html(md: str) -> str:
    """The subset of markdown report.md uses: headings, tables, paragraphs."""
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
            continue
        m = re.match(r"(#{1,4}) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def render(report: dict, md: str, charts: dict[str, bytes]) -> str:
    """The page: report.md's content, then each chart (title -> PNG bytes) embedded."""
    body = markdown_to_html(md)
    figs = "\n".join(f"<h3>{html.escape(title)}</h3>\n{_img(png, title)}" for title, png in charts.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(report['name'])}: compression report</title><style>{CSS}</style></head>\n"
            f"<body>\n{body}\n<h2>Charts</h2>\n{figs}\n</body></html>\n")
