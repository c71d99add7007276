"""The buyer's preview of an image (DESIGN.md §3, §5): bombs refused before decoding, upright,
stripped of metadata, downscaled, watermarked over the whole picture on any background, stamped
with the order id, and the same bytes every time."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageCms, ImageStat

from services.media.render import RENDER_VERSION, PreviewRefused, preview_key, render_preview
from shared.settings import load

ROOT = Path(__file__).resolve().parents[1]
ORDER = "ord_7Hq2xKp9Lm3NvB8c"
SETTINGS = load({})


def encoded(im: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def preview(data: bytes, order_id: str = ORDER, settings=SETTINGS) -> Image.Image:
    im = Image.open(io.BytesIO(render_preview(io.BytesIO(data), order_id, settings)))
    assert im.format == "JPEG"
    return im


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width×height black pixels: tiny on disk, huge once decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = (b"\x00" + bytes((width + 7) // 8)) * 1000
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(rows) for _ in range(height // 1000)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width×height."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), "red"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(autouse=True)
def pillow_guard(monkeypatch):
    """render_preview sets Pillow's process-wide pixel guard from its settings; put it back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png_bomb(30000, 30000))
    return path


# --- refused before decoding -------------------------------------------------------------------

def test_a_decompression_bomb_is_refused_quickly_without_decoding(bomb):
    assert bomb.stat().st_size < 1_000_000  # 900 megapixels in a small file
    started = time.perf_counter()
    with pytest.raises(PreviewRefused, match="more pixels than the limit of 40,000,000"):
        render_preview(bomb, ORDER, SETTINGS)
    assert time.perf_counter() - started < 1.0


def test_refusing_a_bomb_does_not_raise_memory(bomb):
    """In a fresh process, so its peak RSS is the refusal's alone (decoding would need 900 MB).
    The peak is VmHWM: ru_maxrss would include pytest's own, inherited across fork."""
    script = textwrap.dedent(f"""
        import sys
        from services.media.render import PreviewRefused, render_preview
        from shared.settings import load
        try:
            render_preview({str(bomb)!r}, "ord_x", load({{}}))
            sys.exit("rendered")
        except PreviewRefused:
            with open("/proc/self/status") as status:
                print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 80 * 1024  # KB: the interpreter and Pillow (about 30 MB), no pixels


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("data", [jpeg_claiming(60000, 60000), jpeg_claiming(8000, 6000)],
                         ids=["jpeg-3.6-gigapixels", "jpeg-48-megapixels"])
def test_a_jpeg_over_the_pixel_limit_is_refused(data):
    with pytest.raises(PreviewRefused, match="pixels"):
        render_preview(io.BytesIO(data), ORDER, SETTINGS)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_is_the_setting():
    data = encoded(Image.new("RGB", (400, 300), "white"), "PNG")
    with pytest.raises(PreviewRefused, match="400×300"):
        render_preview(io.BytesIO(data), ORDER, SETTINGS.replace(media_max_pixels=100_000))
    assert preview(data, settings=SETTINGS.replace(media_max_pixels=120_000)).size == (400, 300)


@pytest.mark.parametrize("data", [
    b"just some text, not a picture",
    encoded(Image.new("RGB", (64, 64), "red"), "BMP"),  # a format outside the four we take
    encoded(Image.new("RGB", (64, 64), "red"), "TIFF"),
    encoded(Image.new("RGB", (640, 480), "red"), "JPEG")[:2000],  # cut short
], ids=["text", "bmp", "tiff", "truncated-jpeg"])
def test_what_cannot_be_decoded_is_refused_with_a_reason(data):
    with pytest.raises(PreviewRefused) as refused:
        render_preview(io.BytesIO(data), ORDER, SETTINGS)
    assert len(str(refused.value)) > 20


# --- geometry ------------------------------------------------------------------------------------

def test_exif_orientation_is_applied():
    """A landscape photo stored sideways (Orientation 6) comes out portrait, its stored top-left
    corner now top-right, as a viewer shows it."""
    stored = Image.new("RGB", (3000, 1500), (40, 40, 200))
    stored.paste((220, 20, 20), (0, 0, 600, 600))
    exif = Image.Exif()
    exif[0x0112] = 6
    im = preview(encoded(stored, "JPEG", exif=exif, quality=90))
    assert im.size == (512, 1024)
    top_right = ImageStat.Stat(im.crop((412, 20, 492, 100))).mean
    top_left = ImageStat.Stat(im.crop((20, 20, 100, 100))).mean
    assert top_right[0] > top_right[2] + 80, top_right
    assert top_left[2] > top_left[0] + 80, top_left


def test_metadata_is_stripped():
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # GPS latitude
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encoded(Image.new("RGB", (800, 600), "teal"), "JPEG", exif=exif, icc_profile=icc,
                   comment=b"shot at home")
    assert b"Exif" in data and b"ICC_PROFILE" in data
    out = render_preview(io.BytesIO(data), ORDER, SETTINGS)
    assert b"Exif" not in out and b"ICC_PROFILE" not in out and b"shot at home" not in out
    im = Image.open(io.BytesIO(out))
    assert not im.getexif() and "icc_profile" not in im.info and "comment" not in im.info


@pytest.mark.parametrize("size,expected", [((4000, 3000), (1024, 768)), ((2000, 3000), (683, 1024)),
                                           ((5000, 1000), (1024, 205)), ((1024, 1024), (1024, 1024))])
def test_the_long_edge_is_at_most_the_setting_and_the_aspect_is_kept(size, expected):
    for fmt in ("JPEG", "PNG"):
        assert preview(encoded(Image.new("RGB", size, "olive"), fmt)).size == expected


def test_the_edge_is_the_setting():
    data = encoded(Image.new("RGB", (4000, 3000), "olive"), "JPEG")
    assert preview(data, settings=SETTINGS.replace(preview_max_edge=640)).size == (640, 480)


def test_a_small_image_is_not_upscaled():
    assert preview(encoded(Image.new("RGB", (300, 200), "olive"), "PNG")).size == (300, 200)


# --- modes and frames ------------------------------------------------------------------------------

def dominant(im: Image.Image) -> tuple[float, float, float]:
    return tuple(ImageStat.Stat(im.convert("RGB")).median)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_an_animation_renders_its_first_frame(fmt):
    frames = [Image.new("RGB", (320, 240), colour) for colour in ((230, 0, 0), (0, 200, 0), (0, 0, 230))]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    red, green, blue = dominant(preview(data))
    assert red > 180 and green < 60 and blue < 60


def test_transparency_is_flattened_onto_white():
    """Not onto whatever colour the transparent pixels happen to hold."""
    data = encoded(Image.new("RGBA", (400, 300), (0, 0, 255, 0)), "PNG")
    assert all(c > 230 for c in dominant(preview(data)))


def test_a_palette_image_with_transparency():
    im = Image.new("P", (400, 300), 1)
    im.putpalette([255, 255, 255, 0, 0, 255] + [0] * 762)
    data = encoded(im, "PNG", transparency=1)
    assert all(c > 230 for c in dominant(preview(data)))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    data = encoded(Image.new("I;16", (400, 300), 32768), "PNG")
    grey = dominant(preview(data))
    assert all(100 < c < 160 for c in grey), grey


def test_a_cmyk_jpeg_comes_out_rgb():
    data = encoded(Image.new("CMYK", (400, 300), (0, 255, 255, 0)), "JPEG")
    im = preview(data)
    red, green, blue = dominant(im)
    assert im.mode == "RGB" and red > 180 and green < 80 and blue < 80


# --- the mark and the stamp --------------------------------------------------------------------------

def regions(im: Image.Image, n: int = 3):
    width, height = im.size
    for row in range(n):
        for col in range(n):
            yield im.crop((col * width // n, row * height // n, (col + 1) * width // n, (row + 1) * height // n))


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (128, 128, 128)], ids=["white", "black", "grey"])
@pytest.mark.parametrize("size", [(1600, 1200), (900, 1600), (3000, 600), (240, 180)])
def test_a_flat_image_shows_the_mark_everywhere(colour, size):
    """Every cell of a 3×3 grid carries the mark, so no crop of a third of the picture escapes it."""
    im = preview(encoded(Image.new("RGB", size, colour), "PNG")).convert("L")
    spreads = [ImageStat.Stat(region).stddev[0] for region in regions(im)]
    assert min(spreads) > 8, spreads


def test_the_mark_is_semi_transparent():
    """The picture still shows through: no pixel of a mid-grey picture turns pure white or black."""
    low, high = preview(encoded(Image.new("RGB", (1200, 900), (128, 128, 128)), "PNG")).crop(
        (0, 0, 1024, 700)).convert("L").getextrema()
    assert 40 < low and high < 215


def test_the_order_id_is_stamped_small_in_a_corner():
    data = encoded(Image.new("RGB", (1600, 1200), (90, 140, 60)), "JPEG")
    one, other = preview(data, "ord_AAAAAAAAAAAAAAAA"), preview(data, "ord_ZZZZZZZZZZZZZZZZ")
    changed = ImageChops.difference(one, other).getbbox()
    assert changed is not None
    left, top, right, bottom = changed
    assert left > one.width // 2 and top > one.height * 0.9 and right == one.width and bottom == one.height


def test_rendering_twice_gives_the_same_key_and_the_same_bytes():
    data = encoded(Image.new("RGB", (2000, 1500), "navy"), "JPEG")
    first = render_preview(io.BytesIO(data), ORDER, SETTINGS)
    assert render_preview(io.BytesIO(data), ORDER, SETTINGS) == first
    sha = "ab" * 32
    assert preview_key(sha, ORDER) == preview_key(sha, ORDER) == f"previews/{sha}-{ORDER}-r{RENDER_VERSION}.jpg"
    assert preview_key(sha, "ord_other") != preview_key(sha, ORDER)


def test_a_path_works_as_the_source(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded(Image.new("RGB", (2000, 1500), "navy"), "JPEG"))
    assert Image.open(io.BytesIO(render_preview(path, ORDER, SETTINGS))).size == (1024, 768)
