"""Preview rendering against a bare resize and against ImageMagick (`bench/watermark.py`).

Generates two inputs in a temp dir: a 12 MP JPEG (4000×3000, gradients, shapes and grain, so its
size is a camera photo's) and a 3 MP PNG (2000×1500). Then, in interleaved rounds, times one call
of each of:

- render: `services.media.render.render_preview` (orientation, RGB, thumbnail to the preview edge,
  the tiled watermark, the order-id stamp, JPEG encode), its watermark already built (a worker
  builds it once per process; the fresh-process line below shows that first render);
- floor: Pillow alone, open, JPEG draft mode, thumbnail to the same edge, encode at the same quality,
  no mark: the least any preview can cost;
- convert: ImageMagick in a subprocess, `convert IN -resize 1024x1024 -fill ... -annotate ... OUT`,
  i.e. the same resize plus one annotation (skipped, and said so, when no working ImageMagick).

It prints the medians and the ratios against the targets (render ≤ 1.3 × floor, render ≥ 4 × faster
than convert), and the peak RSS of rendering the 12 MP JPEG in a fresh process (target ≤ 250 MB),
next to the same process's peak before rendering, and its first render (which builds the
watermark). The peak is the kernel's high-water mark of the process's own memory
(VmHWM in /proc/self/status). Its ru_maxrss is printed too but is not the figure: Linux carries
the parent's high-water mark into a forked child across exec, so it reads at least this bench's
own size.

It reports, it does not gate: exit 0 whether or not the targets are met, 1 on any error.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import PIL  # noqa: E402
from PIL import Image, ImageChops, ImageDraw, ImageFilter, features  # noqa: E402

from bench.api import loadavg, log, machine  # noqa: E402
from services.media.render import QUALITY, fitted, render_preview  # noqa: E402
from shared.settings import load  # noqa: E402

TARGET_FLOOR_RATIO = 1.3  # render ≤ this × floor
TARGET_CONVERT_SPEEDUP = 4.0  # render ≥ this × faster than convert
TARGET_RSS_MB = 250
ORDER_ID = "ord_9ZpQ4rWm2LxT7bKc"
INPUTS = (("12 MP JPEG", "photo-12mp.jpg", (4000, 3000), 12), ("3 MP PNG", "art-3mp.png", (2000, 1500), 4))


# --- inputs ------------------------------------------------------------------------------------------

def picture(size: tuple[int, int], grain: float) -> Image.Image:
    """Gradients, soft-edged shapes and per-channel grain: compresses like a photo, not like a flat fill."""
    width, height = size
    shapes = random.Random(size[0])
    base = Image.merge("RGB", (Image.linear_gradient("L").rotate(90).resize(size),
                               Image.radial_gradient("L").resize(size), Image.linear_gradient("L").resize(size)))
    draw = ImageDraw.Draw(base)
    for _ in range(40):
        x, y, r = shapes.randrange(width), shapes.randrange(height), shapes.randrange(20, width // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(shapes.randrange(256) for _ in range(3)))
    base = base.filter(ImageFilter.GaussianBlur(3))
    noise = Image.merge("RGB", [Image.effect_noise(size, grain) for _ in range(3)])
    return ImageChops.add(base, noise, offset=-128)


def make_inputs(folder: Path) -> list[tuple[str, Path]]:
    made = []
    for label, name, size, grain in INPUTS:
        path = folder / name
        im = picture(size, grain)
        if path.suffix == ".jpg":
            exif = Image.Exif()
            exif[0x010F], exif[0x0112] = "BenchCam", 1  # Make, Orientation: as a camera writes them
            im.save(path, "JPEG", quality=90, exif=exif)
        else:
            im.save(path, "PNG")
        made.append((label, path))
    return made


# --- the three contenders ----------------------------------------------------------------------------

def floor(path: Path, edge: int) -> bytes:
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", fitted(im.size, edge))
        im.thumbnail((edge, edge))
        out = io.BytesIO()
        (im if im.mode == "RGB" else im.convert("RGB")).save(out, "JPEG", quality=QUALITY)
        return out.getvalue()


def convert_argv(binary: str, source: Path, target: Path, edge: int) -> list[str]:
    return [binary, str(source), "-resize", f"{edge}x{edge}", "-fill", "rgba(255,255,255,0.45)",
            "-stroke", "rgba(0,0,0,0.3)", "-pointsize", "64", "-gravity", "center", "-annotate", "330x330+0+0",
            "PREVIEW", "-quality", str(QUALITY), str(target)]


def working_convert(binary: str, folder: Path, edge: int) -> tuple[bool, str]:
    """Whether `binary` is an ImageMagick that can do the job, and what it is (or why not)."""
    try:
        version = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return False, f"{binary}: {exc}"
    said = (version.stdout + version.stderr).strip().splitlines()
    if version.returncode != 0 or "ImageMagick" not in version.stdout.split("\n", 1)[0]:
        return False, f"`{binary} -version` says: {' / '.join(said[:2]) or version.returncode}"
    probe = folder / "probe.png"
    Image.new("RGB", (64, 48), "white").save(probe)
    done = subprocess.run(convert_argv(binary, probe, folder / "probe.jpg", edge), capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0 or not (folder / "probe.jpg").exists():
        return False, f"`{binary}` failed on a small PNG: {done.stderr.strip()[:200]}"
    return True, said[0]


def default_convert() -> str:
    """`convert` on PATH may be something else (a stand-in); Debian's ImageMagick is /usr/bin/convert."""
    for candidate in dict.fromkeys(filter(None, (shutil.which("convert"), "/usr/bin/convert"))):
        try:
            first = subprocess.run([candidate, "-version"], capture_output=True, text=True, timeout=30).stdout
        except OSError:
            continue
        if first.startswith("Version: ImageMagick"):
            return candidate
    return shutil.which("convert") or "convert"


def convert(binary: str, source: Path, target: Path, edge: int) -> None:
    subprocess.run(convert_argv(binary, source, target, edge), check=True, capture_output=True, timeout=120)


# --- measuring ----------------------------------------------------------------------------------------

def timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def peak_rss(path: Path) -> dict:
    """Render twice in a fresh interpreter: its peak RSS before and after, and both renders' times."""
    script = textwrap.dedent(f"""
        import json, resource, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from services.media.render import render_preview
        from shared.settings import load
        def high_water_kb():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        settings = load()
        before = high_water_kb()
        times = []
        for _ in range(2):
            started = time.perf_counter()
            render_preview({str(path)!r}, {ORDER_ID!r}, settings)
            times.append((time.perf_counter() - started) * 1000)
        print(json.dumps({{"before_kb": before, "after_kb": high_water_kb(), "first_ms": times[0],
                          "second_ms": times[1], "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the RSS probe failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (figures not meaningful)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, quick 2)")
    parser.add_argument("--convert", default=default_convert(),
                        help="the ImageMagick convert binary (default: the first real ImageMagick among "
                             "convert on PATH and /usr/bin/convert)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 15)
    settings = load()  # as the worker reads them, so PREVIEW_MAX_EDGE applies here too
    edge = settings.preview_max_edge

    with tempfile.TemporaryDirectory(prefix="bench-watermark-") as tmp:
        folder = Path(tmp)
        try:
            log("generating the inputs ...")
            inputs = make_inputs(folder)
            has_convert, convert_is = working_convert(args.convert, folder, edge)
            contenders = {"floor": lambda p: floor(p, edge), "render": lambda p: render_preview(p, ORDER_ID, settings)}
            if has_convert:
                contenders["convert"] = lambda p: convert(args.convert, p, folder / "out.jpg", edge)
            times = {(label, name): [] for label, _ in inputs for name in contenders}
            for _, path in inputs:  # warm-up: imports, page cache, the watermark
                for call in contenders.values():
                    call(path)
            for n in range(rounds):
                log(f"round {n + 1}/{rounds}")
                for label, path in inputs:
                    for name, call in contenders.items():
                        times[label, name].append(timed(lambda: call(path)))
            rss = peak_rss(inputs[0][1])
        except Exception as exc:  # noqa: BLE001  (any failure is the run's failure: report and exit 1)
            log(f"error: {exc.__class__.__name__}: {exc}")
            return 1

        print(f"machine: {machine()}, load {loadavg()}")
        print(f"Python {sys.version.split()[0]}, Pillow {PIL.__version__} "
              f"(libjpeg-turbo {features.version('libjpeg_turbo')}, zlib {features.version('zlib')})")
        for label, path in inputs:
            with Image.open(path) as im:
                print(f"input {label}: {path.name} {im.width}×{im.height}, {path.stat().st_size / 1e6:.1f} MB")
        print(f"ImageMagick: {convert_is if has_convert else 'unavailable, column skipped: ' + convert_is}")
        print(f"{rounds} interleaved rounds; median ms per call; preview edge {edge}, JPEG quality {QUALITY}")
        print()
        medians = {key: statistics.median(values) for key, values in times.items()}
        header = f"{'image':<12} {'floor':>8} {'render':>8} {'render/floor':>13}"
        print(header + (f" {'convert':>9} {'convert/render':>15}" if has_convert else ""))
        floor_ok = convert_ok = True
        for label, _ in inputs:
            ratio = medians[label, "render"] / medians[label, "floor"]
            floor_ok &= ratio <= TARGET_FLOOR_RATIO
            row = f"{label:<12} {medians[label, 'floor']:>8.1f} {medians[label, 'render']:>8.1f} {ratio:>13.2f}"
            if has_convert:
                speedup = medians[label, "convert"] / medians[label, "render"]
                convert_ok &= speedup >= TARGET_CONVERT_SPEEDUP
                row += f" {medians[label, 'convert']:>9.1f} {speedup:>14.1f}×"
            print(row)
        print()
        peak_mb, base_mb = rss["after_kb"] / 1024, rss["before_kb"] / 1024
        print(f"peak RSS rendering the 12 MP JPEG in a fresh process (VmHWM): {peak_mb:.0f} MB, of which "
              f"{base_mb:.0f} MB before rendering (interpreter, Pillow, settings); its ru_maxrss "
              f"{rss['ru_maxrss_kb'] / 1024:.0f} MB includes this bench's own peak, inherited across fork")
        print(f"first render in that process {rss['first_ms']:.0f} ms (builds the watermark), "
              f"second {rss['second_ms']:.0f} ms")
        print()
        print(f"target render ≤ {TARGET_FLOOR_RATIO} × floor: {verdict(floor_ok)}")
        print(f"target render ≥ {TARGET_CONVERT_SPEEDUP:g} × faster than ImageMagick: "
              f"{verdict(convert_ok) if has_convert else 'not measured (no ImageMagick)'}")
        print(f"target peak RSS ≤ {TARGET_RSS_MB} MB: {verdict(peak_mb <= TARGET_RSS_MB)}")
        if args.quick:
            print("(--quick: too few rounds for the figures to mean much)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
