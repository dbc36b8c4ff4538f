"""The qualitative retrieval figure: test queries and their top-10 results, correct ones marked.

A title line names the run folder and the iteration, and says "SYNTHETIC CSS stand-in" (in red)
when the data are the synthetic stand-in; the PNG's ``Title`` text chunk holds the same line.
Each row shows a query (its source image and modification text), the 10 most similar gallery
images in rank order with the correct ones (the target's label) framed green and the others
framed gray, and, after a gap, the query's target image framed blue. The figure is drawn with
PIL only, so training needs no plotting package; ``main`` writes it after the final evaluation
to ``<run>/qualitative.png`` and to TensorBoard (tag ``qualitative/test``).

The ranked lists come from ``test_retrieval.test`` (``result["ranked"]``), so the figure costs no
extra encoding. Example, from a saved run:

    python main.py --dataset=css3d --model=tirg --test_only --model_checkpoint=logs/RUN/best.pt
    # -> logs/<new run>/qualitative.png
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.PngImagePlugin
import torch

CELL = 96  # pixels per image
BORDER = 5
GAP = 8
FONT_SIZE = 13
TITLE_FONT_SIZE = 15
SYNTHETIC_NOTE = "SYNTHETIC CSS stand-in (not the real CSS data)"
CORRECT = (30, 170, 40)
WRONG = (200, 200, 200)
TARGET = (40, 90, 220)
PNG_NAME = "qualitative.png"
TB_TAG = "qualitative/test"


def _font(size: int = FONT_SIZE):
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed-size bitmap font
        return PIL.ImageFont.load_default()


def _to_pil(img) -> PIL.Image.Image:
    """A dataset image (PIL, (H, W, 3) array or (3, H, W) uint8 tensor) as an RGB PIL image."""
    if isinstance(img, PIL.Image.Image):
        return img.convert("RGB")
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu()
        if img.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image tensor, got {img.dtype}")
        img = img.permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB")


def _load(dataset, img_id: int) -> PIL.Image.Image:
    try:
        img = dataset.get_img(img_id, raw_img=True)
    except TypeError:  # a dataset whose get_img has no raw_img
        img = dataset.get_img(img_id)
    return _to_pil(img)


def _tile(img: PIL.Image.Image, frame, cell: int = CELL) -> PIL.Image.Image:
    """The image fitted into a (cell x cell) white square inside a frame of colour ``frame``."""
    inner = cell - 2 * BORDER
    img = img.copy()
    # Small renders (CSS is 64x64) are enlarged without blurring; photos are shrunk smoothly.
    scale = inner / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, PIL.Image.NEAREST if scale > 1 else PIL.Image.BILINEAR)
    tile = PIL.Image.new("RGB", (cell, cell), frame)
    canvas = PIL.Image.new("RGB", (inner, inner), (255, 255, 255))
    canvas.paste(img, ((inner - img.width) // 2, (inner - img.height) // 2))
    tile.paste(canvas, (BORDER, BORDER))
    return tile


def title_parts(run_dir: str, iteration: int, synthetic: bool) -> list[str]:
    """The title line in parts: the run folder's name, the iteration and, on the synthetic CSS,
    ``SYNTHETIC_NOTE``."""
    parts = [os.path.basename(os.path.normpath(run_dir)), f"iteration {iteration}"]
    return parts + ([SYNTHETIC_NOTE] if synthetic else [])


def render_qualitative(
    dataset, queries: list[dict], ranked: list[dict], cell: int = CELL, title: list[str] = ()
):
    """The figure as an (H, W, 3) uint8 array.

    queries: the test queries (``dataset.get_test_queries()``); ranked: ``[{"query_index",
    "gallery_ids", "correct"}]`` from ``test_retrieval.evaluate``; title: the parts of a title
    line (``title_parts``), joined by " | ", the synthetic note in red. Returns None when ranked
    is empty.
    """
    if not ranked:
        return None
    font = _font()
    n_results = max(len(r["gallery_ids"]) for r in ranked)
    text_height = FONT_SIZE + 8
    row_height = text_height + cell + FONT_SIZE + 12  # header, images, rank numbers
    title_height = TITLE_FONT_SIZE + 2 * GAP if title else 0
    width = GAP + cell + 2 * GAP + n_results * cell + 3 * GAP + cell + GAP
    height = title_height + len(ranked) * row_height + GAP
    figure = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(figure)
    chars = max(20, (width - 2 * GAP) // 7)
    if title:
        title_font, x = _font(TITLE_FONT_SIZE), GAP
        for i, part in enumerate(title):
            text = (" | " if i else "") + part
            color = (200, 0, 0) if part == SYNTHETIC_NOTE else (0, 0, 0)
            draw.text((x, GAP), text, fill=color, font=title_font)
            x += draw.textlength(text, font=title_font)
    for row, entry in enumerate(ranked):
        query = queries[entry["query_index"]]
        y = title_height + GAP + row * row_height
        hits = sum(entry["correct"])
        header = (
            f'query {entry["query_index"]}: "{query["mod"]["str"]}"   '
            f"({hits} correct in the top {len(entry['gallery_ids'])})"
        )
        draw.text((GAP, y), textwrap.shorten(header, chars), fill=(0, 0, 0), font=font)
        y += text_height
        x = GAP
        figure.paste(_tile(_load(dataset, query["source_img_id"]), (0, 0, 0), cell), (x, y))
        draw.text((x, y + cell + 1), "query", fill=(0, 0, 0), font=font)
        x += cell + 2 * GAP
        for rank, (img_id, correct) in enumerate(zip(entry["gallery_ids"], entry["correct"])):
            frame = CORRECT if correct else WRONG
            figure.paste(_tile(_load(dataset, img_id), frame, cell), (x, y))
            label = CORRECT if correct else (110, 110, 110)
            draw.text((x, y + cell + 1), f"{rank + 1}", fill=label, font=font)
            x += cell
        x = width - GAP - cell
        target = query.get("target_img_id")
        if target is not None:
            figure.paste(_tile(_load(dataset, target), TARGET, cell), (x, y))
            draw.text((x, y + cell + 1), "target", fill=TARGET, font=font)
    return np.asarray(figure)


def save_png(path: str, figure: np.ndarray, title: str | None = None) -> None:
    """Write atomically (a temporary file, then rename), so a viewer never sees half a PNG;
    ``title`` goes into the PNG's ``Title`` text chunk."""
    tmp = f"{path}.tmp.{os.getpid()}.png"
    info = PIL.PngImagePlugin.PngInfo()
    if title:
        info.add_itxt("Title", title)
    try:
        PIL.Image.fromarray(figure).save(tmp, pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def log_qualitative(run, dataset, result: dict | None, iteration: int) -> str | None:
    """Draw the figure of an evaluation result (``main.evaluate_all``) into ``run.dir`` and
    TensorBoard, titled with the run folder, the iteration and, on the synthetic CSS, that it is
    the stand-in. Returns the PNG's path, or None when the result holds no ranked queries."""
    ranked = (result or {}).get("ranked")
    title = title_parts(run.dir, iteration, bool(getattr(dataset, "synthetic", False)))
    figure = render_qualitative(dataset, dataset.get_test_queries(), ranked or [], title=title)
    if figure is None:
        return None
    path = os.path.join(run.dir, PNG_NAME)
    save_png(path, figure, " | ".join(title))
    run.writer.add_image(TB_TAG, figure, iteration, dataformats="HWC")
    run.writer.flush()
    return path
