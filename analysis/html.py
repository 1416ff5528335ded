"""Self-contained HTML reports: figures embedded as PNG data, tables from records."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from closedloop.files import write_text

__all__ = ["make_figure", "render_figure", "render_table", "write_page"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; max-width: 900px; }
.note { color: #555; font-size: 0.9em; }
"""


def make_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1):
    """A matplotlib (figure, axes) pair drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), constrained_layout=True)


def render_figure(figure, caption: str = "") -> str:
    """An HTML <figure> with ``figure`` embedded as a PNG (the figure is closed)."""
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def render_table(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    """An HTML table of ``rows`` (dicts); floats rounded to ``digits`` significant digits."""
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns = columns or list(rows[0])

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return html.escape("—" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_page(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write a standalone HTML page: ``sections`` are (heading, HTML body) pairs. Atomic."""
    parts = [f"<h2>{html.escape(heading)}</h2>\n{body}" for heading, body in sections]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "</body></html>\n")
    return write_text(path, page)
