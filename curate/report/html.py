"""The report as one self-contained HTML file (``report/report.html`` beside ``report.md``).

The markdown report is rendered with Python-Markdown (tables extension); every plot it references is
inlined as a ``data:`` URI, so the file can be mailed or attached to a ticket and still shows its
images; every table is sortable (click a header; numbers sort as numbers); export files named in the
report link to the files (relative paths, so the link works wherever the output folder goes).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from curate.io import write_text

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3;cursor:pointer;user-select:none}th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}code{background:#f6f6f6;padding:0 3px}
"""

# our own: click a header to sort its table by that column (numbers as numbers, then text)
SORT_JS = """
document.querySelectorAll('table').forEach(function (table) {
  table.classList.add('sortable');
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = !th.classList.contains('sorted-asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('sorted-asc', 'sorted-desc'); });
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      function key(r) { var t = r.cells[col].textContent.trim(), n = parseFloat(t.replace(/,/g, ''));
                        return isNaN(n) || !/^[-+]?[\\d.,]+(e[-+]?\\d+)?$/i.test(t) ? [1, t.toLowerCase()] : [0, n]; }
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        var c = x[0] - y[0] || (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0); return asc ? c : -c; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

IMG = re.compile(r'<img alt="([^"]*)" src="([^"]+\.png)"\s*/?>')


def write_html(md_path: str | Path, export_dir: str | Path | None = None) -> str:
    """Render ``report.md`` to ``report.html`` beside it; returns the HTML path."""
    import markdown

    md_path = Path(md_path)
    text = md_path.read_text(encoding="utf-8")
    body = markdown.markdown(text, extensions=["tables"], output_format="html")

    def inline(m: re.Match) -> str:
        png = md_path.parent / m.group(2)
        if not png.exists():
            return m.group(0)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        return f'<img alt="{m.group(1)}" src="data:image/png;base64,{data}" />'

    body = IMG.sub(inline, body)
    if export_dir is not None:
        rel = Path("..") / Path(export_dir).name if Path(export_dir).parent == md_path.parent.parent else Path(export_dir)
        # the Exports section lists the exported files (paths relative to the export folder): link them
        head, sep, tail = body.partition("<h2>Exports</h2>")
        for path in sorted(set(re.findall(r"<td>([\w./-]+\.(?:jsonl|parquet))</td>", tail))):
            tail = tail.replace(f"<td>{path}</td>", f'<td><a href="{html.escape(str(rel / path))}">{path}</a></td>')
        body = head + sep + tail
    title = html.escape(text.splitlines()[0].lstrip("# ").strip() if text else "curate report")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>\n'
            f"<body>\n{body}\n<script>{SORT_JS}</script>\n</body></html>\n")
    out = md_path.with_suffix(".html")
    write_text(out, page)
    return str(out)
