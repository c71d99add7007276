"""The buyer's preview of an image deliverable (DESIGN.md §3): downscaled, upright, without
metadata, watermarked across the whole picture so no crop removes the mark, and stamped with the
order id so a leaked preview can be traced.

It costs little more than a bare decode-resize-encode: a JPEG decodes at a reduced DCT scale
(draft mode), the watermark is built once and cut to each picture's size (panoramas get their own),
and marking is one paste through its mask; nothing runs per pixel in Python."""
from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from typing import BinaryIO

from PIL import (Image, ImageChops, ImageDraw, ImageFile, ImageFilter, ImageFont, ImageMath, ImageOps,
                 UnidentifiedImageError)

from shared.settings import Settings

RENDER_VERSION = 1
# the image types shared.filetypes admits; no other decoder is ever reached
FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
QUALITY = 80
BACKGROUND = (255, 255, 255)  # what transparent parts become
MARK_TEXT = "PREVIEW"
MARK_ANGLE = 30
MARK_DARK_ALPHA = 80  # of 255: the outline, seen on light pictures
MARK_LIGHT_ALPHA = 110  # the letters, seen on dark ones
STAMP_BOX_ALPHA = 190


class PreviewRefused(Exception):
    """This image gets no preview; the message says why, in words the agent can act on."""


def preview_key(sha256: str, order_id: str) -> str:
    """Where the preview of these bytes for this order lives: rendering again finds it."""
    return f"previews/{sha256}-{order_id}-r{RENDER_VERSION}.jpg"


def render_preview(source: BinaryIO | str | os.PathLike, order_id: str, settings: Settings) -> bytes:
    """The preview as JPEG bytes. Raises PreviewRefused for what cannot or must not be decoded."""
    limit = settings.media_max_pixels
    Image.MAX_IMAGE_PIXELS = limit  # Pillow's own guard, for any path that would decode more
    try:
        with Image.open(source, formats=FORMATS) as original:
            width, height = original.size
            if width * height > limit:
                raise PreviewRefused(_too_large(width, height, limit))
            picture = _downscaled(original, settings.preview_max_edge)
    except Image.DecompressionBombError as exc:  # Pillow's guard fires in open() for over twice the limit
        raise PreviewRefused(f"The image has far more pixels than the limit of {limit:,} and is not processed. "
                             "Deliver a smaller version.") from exc
    except UnidentifiedImageError as exc:
        raise PreviewRefused("The file is not an image we can read (JPEG, PNG, GIF or WebP).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PreviewRefused(f"The image is damaged or truncated and cannot be decoded ({exc}).") from exc
    _watermark(picture)
    _stamp(picture, order_id)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=QUALITY, optimize=False)
    return out.getvalue()


def _too_large(width: int, height: int, limit: int) -> str:
    return (f"The image is {width}×{height} pixels ({width * height:,}); images over {limit:,} pixels "
            "are not processed. Deliver a smaller version.")


def fitted(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """`size` scaled down (never up) so its long edge is at most `edge`."""
    width, height = size
    scale = min(1.0, edge / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _downscaled(im: ImageFile.ImageFile, edge: int) -> Image.Image:
    """The first frame (where Image.open leaves an animation), upright, RGB, long edge ≤ `edge`;
    a new image, independent of the open file."""
    if im.format == "JPEG":
        # the request is only ever a reduction; a square bound fits the stored and the upright
        # orientation alike, so the stored size gives the right DCT scale
        im.draft("RGB", fitted(im.size, edge))
    resizable = _resizable(im)
    resizable.thumbnail((edge, edge))
    upright = ImageOps.exif_transpose(resizable)
    if upright.mode == "RGBA":
        flat = Image.new("RGB", upright.size, BACKGROUND)
        flat.paste(upright, (0, 0), upright.getchannel("A"))
    else:
        flat = upright if upright.mode == "RGB" else upright.convert("RGB")
    flat.info.clear()  # EXIF, ICC and comments travel along with an image; the preview has none
    return flat


def _resizable(im: Image.Image) -> Image.Image:
    """A mode that resamples properly (a palette would resize by nearest neighbour)."""
    if im.mode in ("RGB", "RGBA", "L", "CMYK"):
        return im
    if im.mode.startswith("I"):  # 16-bit grey: scale to 8 bits rather than clip to white
        return im.point(lambda v: v / 256).convert("L")
    if im.mode in ("PA", "LA", "La", "RGBa") or "transparency" in im.info:
        return im.convert("RGBA")
    return im.convert("RGB")


def _watermark(picture: Image.Image) -> None:
    long, short = max(picture.size), min(picture.size)
    # letters sized by the long edge, smaller for a narrow strip so it still gets whole words
    overlay, mask = _mark(long, max(10, min(long // 16, short // 8)))
    box = (0, 0, picture.width, picture.height)
    picture.paste(overlay.crop(box), (0, 0), mask.crop(box))


@lru_cache(maxsize=8)
def _mark(edge: int, text_size: int) -> tuple[Image.Image, Image.Image]:
    """The watermark as an edge × edge square to cut pictures' marks from (so the usual aspect
    ratios share one): diagonal rows of text, light letters (seen on dark pictures) over a dark
    outline (seen on light ones). Both layers fold into one overlay and one mask, so marking a
    picture is a single paste."""
    font = _font(text_size)
    left, top, right, bottom = font.getbbox(MARK_TEXT)
    pad = max(1, font.size // 14)
    cell = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(cell).text((pad - left, pad - top), MARK_TEXT, fill=255, font=font)
    cell_outline = cell.filter(ImageFilter.MaxFilter(2 * pad + 1))
    side = math.isqrt(2 * edge * edge) + 2  # a square whose rotation still covers the edge × edge one
    letters, outline = Image.new("L", (side, side)), Image.new("L", (side, side))
    step_x, step_y = cell.width * 3 // 2, cell.height * 2
    for row, y in enumerate(range(-step_y // 2, side, step_y)):
        for x in range(-(row % 2) * step_x // 2, side, step_x):
            letters.paste(cell, (x, y))
            outline.paste(cell_outline, (x, y))
    margin = (side - edge) // 2
    box = (margin, margin, margin + edge, margin + edge)
    letters, outline = _faded(letters, box, MARK_LIGHT_ALPHA), _faded(outline, box, MARK_DARK_ALPHA)
    # black through `outline`, then white through `letters`, is one paste of `shade` through `mask`
    mask = ImageChops.screen(outline, letters)
    shade = ImageMath.lambda_eval(lambda m: m["letters"] * 255 / m["mask"], letters=letters, mask=mask).convert("L")
    return Image.merge("RGB", (shade, shade, shade)), mask


def _faded(mask: Image.Image, box: tuple[int, int, int, int], alpha: int) -> Image.Image:
    """The mask turned diagonal, cut to the picture, at the mark's opacity."""
    return mask.rotate(MARK_ANGLE, Image.Resampling.BILINEAR).crop(box).point(lambda v: v * alpha // 255)


def _stamp(picture: Image.Image, order_id: str) -> None:
    """The order id, small and legible, in the bottom-right corner on a dark box."""
    font = _font(max(9, max(picture.size) // 64))
    left, top, right, bottom = font.getbbox(order_id)
    pad = max(2, font.size // 4)
    x0 = picture.width - (right - left) - 2 * pad
    y0 = picture.height - (bottom - top) - 2 * pad
    draw = ImageDraw.Draw(picture, "RGBA")
    draw.rectangle((x0, y0, picture.width, picture.height), fill=(0, 0, 0, STAMP_BOX_ALPHA))
    draw.text((x0 + pad - left, y0 + pad - top), order_id, fill=(255, 255, 255, 255), font=font)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)
