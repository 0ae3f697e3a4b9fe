"""The explanation as one self-contained HTML page: every picture embedded as a base64 PNG, the
styles inline, no script, font or file fetched from anywhere, so that it opens offline from disk."""

from __future__ import annotations

import base64
import html
import io

from PIL import Image

from rcnn.explain.stages import Explanation
from rcnn.viz import png_info

__all__ = ["GENERATOR", "png_bytes", "render_html"]

# The page's generator tag: a later run may overwrite a page that carries it (rcnn explain --out).
GENERATOR = '<meta name="generator" content="rcnn explain">'

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
.meta { color: #555; margin-top: 0; }
.stage { border-top: 1px solid #ddd; padding: .6em 0 1em; }
.stage h2 { font-size: 1.15em; margin: .3em 0; }
.stage img { max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
.caption { margin: .4em 0; max-width: 60em; }
table { border-collapse: collapse; font-size: .85em; margin-top: .5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
th { background: #f3f3f3; }
.times td:last-child { text-align: right; }
"""


def png_bytes(picture: Image.Image) -> bytes:
    """A picture as PNG bytes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True, pnginfo=png_info())  # marked as rcnn's
    return buffer.getvalue()


def _table(rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(explanation: Explanation, title: str = "", pngs: list[bytes] | None = None) -> str:
    """The page: a header (model, image, times), then one section per stage in the pipeline's order.

    ``pngs`` are the stages' pictures already encoded (one per stage, else they are encoded here).
    """
    e = explanation
    pngs = pngs if pngs is not None else [png_bytes(stage.picture) for stage in e.stages]
    heading = f"{e.generation} on {title}" if title else e.generation
    (h, w), (ih, iw) = e.image_size, e.input_size
    times = [["step", "ms"]] + [[k.removesuffix("_s"), f"{1000 * v:.1f}"] for k, v in e.times.items() if k.endswith("_s")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        GENERATOR,
        f"<title>{html.escape(heading)}: stage by stage</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(heading)}, stage by stage</h1>",
        f'<p class="meta">model {html.escape(e.model_class)}; image {w}x{h} px, network input {iw}x{ih} px; '
        f"score threshold {e.score_thresh:g}; proposals {1000 * e.times['proposals']:.1f} ms + rest "
        f"{1000 * e.times['rest']:.1f} ms = {1000 * (e.times['proposals'] + e.times['rest']):.1f} ms</p>",
    ]
    for n, (stage, data) in enumerate(zip(e.stages, pngs), 1):
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<section class="stage" id="stage-{stage.key}" data-stage="{stage.key}">')
        parts.append(f"<h2>{n}. {html.escape(stage.title)}</h2>")
        parts.append(f'<img src="{src}" alt="{html.escape(stage.title)}">')
        parts.append(f'<p class="caption">{html.escape(stage.caption)}</p>')
        if stage.table:
            parts.append(_table(stage.table))
        parts.append("</section>")
    parts.append('<section class="stage" id="stage-times"><h2>Time per step</h2>' + _table(times, "times") + "</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
