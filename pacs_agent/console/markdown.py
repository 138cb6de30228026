"""A small, safe Markdown subset for the training reports of model packages (``report/report.md``).

Everything is HTML-escaped first; only what the training reports use becomes markup: headings
(``#`` to ``####``), bullet lists, pipe tables, paragraphs, ``**bold**``, ```code``` and images
``![alt](file.png)`` naming a PNG beside the report (served by the console's authenticated route;
any other image reference stays text). No raw HTML, no links, no attributes from the document
except the escaped alt text and a checked file name.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from markupsafe import Markup, escape

PNG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.png$")
"""A report image the console serves: a plain file name (no folder, no ``..``) ending in .png."""
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_HEADING = re.compile(r"^(#{1,4})\s+(.*)$")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def _inline(text: str) -> str:
    """Escape ``text``, then turn ``**bold**`` and ```code``` into markup."""
    html = str(escape(text))
    html = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def render(text: str, image_url: Callable[[str], str | None]) -> Markup:
    """``text`` (Markdown) as safe HTML; ``image_url(name)`` gives the address of a report image, or None."""
    out: list[str] = []
    lines = text.splitlines()
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        heading = _HEADING.match(stripped)
        image = _IMAGE.match(stripped)
        if heading:
            flush()
            level = len(heading.group(1)) + 1  # the page has its own h1
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            flush()
            alt, name = image.group(1), image.group(2)
            url = image_url(name) if PNG_NAME.match(name) else None
            if url is None:
                out.append(f"<p>{escape(stripped)}</p>")
            else:
                out.append(f'<figure><img class="report" src="{escape(url)}" alt="{escape(alt)}">')
                out.append(f"<figcaption>{escape(alt)}</figcaption></figure>")
        elif stripped.startswith("- "):
            flush()
            out.append("<ul>")
            while i < len(lines) and lines[i].strip().startswith("- "):
                out.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        elif stripped.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip()):
            flush()
            out.append('<table class="list report"><thead><tr>')
            out.extend(f"<th>{_inline(cell)}</th>" for cell in _cells(stripped))
            out.append("</tr></thead><tbody>")
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])) + "</tr>")
                i += 1
            out.append("</tbody></table>")
            continue
        else:
            paragraph.append(stripped)
        i += 1
    flush()
    return Markup("\n".join(out))  # noqa: S704 - built only from escaped text and fixed tags
