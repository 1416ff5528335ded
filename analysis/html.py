"""Self-contained HTML reports: figures embedded as PNG data, tables from records."""

from __future__ import annotations

import base64
import csv
import html
import io
import shutil
import subprocess
from pathlib import Path

from closedloop.core.files import atomic_path, write_text

__all__ = ["make_figure", "render_figure", "render_table", "render_links", "write_page", "write_csv", "write_pdf"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; max-width: 900px; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; } .summary { background: #f7f7f2; padding: 0.6em 1em; border-left: 4px solid #bbb; }
"""


def make_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1, nrows: int = 1):
    """A matplotlib (figure, axes) pair drawn off-screen (Agg); axes as plt.subplots returns them (squeezed)."""
    import matplotlib  # inside: the backend must be chosen before pyplot loads, and pyplot costs ~2 s of start-up

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), constrained_layout=True)


def render_figure(figure, caption: str = "") -> str:
    """An HTML <figure> with ``figure`` embedded as a PNG (the figure is closed); ``caption`` is plain text."""
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


def render_links(paths: list[Path], base: Path) -> str:
    """A note linking the files ``paths`` (relative to the folder ``base`` of the page)."""
    links = ", ".join(f'<a href="{html.escape(p.relative_to(base).as_posix())}">{html.escape(p.name)}</a>' for p in paths)
    return f'<p class="note">Tables behind this section: {links}</p>' if paths else ""


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts) as CSV with a header (the union of keys, in first-seen order); None is empty. Atomic."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows({key: ("" if value is None else value) for key, value in row.items()} for row in rows)
    return Path(path)


def write_pdf(html_path: str | Path, pdf_path: str | Path, *, timeout_s: float = 120.0) -> Path:
    """Print an HTML page to PDF with headless Chromium (atomic). Raises FileNotFoundError without a browser."""
    browser = next((found for name in _BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        raise FileNotFoundError(
            f"--pdf needs a headless Chromium ({', '.join(_BROWSERS)}) on PATH, but none was found; install one "
            "(Debian: apt-get install chromium) or leave out --pdf."
        )
    source = Path(html_path).resolve()
    with atomic_path(pdf_path) as temporary:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                        f"--print-to-pdf={temporary}", source.as_uri()], check=True, capture_output=True, timeout=timeout_s)
    return Path(pdf_path)


def write_page(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write a standalone HTML page: ``sections`` are (heading, HTML body) pairs. Atomic."""
    parts = [f'<h2 id="s{i}">{html.escape(heading)}</h2>\n{body}' for i, (heading, body) in enumerate(sections)]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "</body></html>\n")
    return write_text(path, page)
