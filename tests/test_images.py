"""Tests of bbservice.images: every image mode to RGB, clear errors, preprocessing."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from bbservice.errors import DataError
from bbservice.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTooLargeError,
    load_image,
    normalize,
    preprocess,
    resize_image,
    to_rgb,
)

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims (width, height), with a tiny IDAT: no pixels to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _check_rgb(im: Image.Image, size: tuple[int, int]) -> None:
    assert im.mode == "RGB"
    assert im.size == size


def test_rgb_png_and_jpeg(tmp_path: Path) -> None:
    src = Image.new("RGB", (30, 20), RED)
    for ext in ("png", "jpg", "bmp", "tiff"):
        path = tmp_path / f"x.{ext}"
        src.save(path)
        im = load_image(path)
        _check_rgb(im, (30, 20))
        assert _close(im.getpixel((5, 5)), RED)


def test_grayscale_and_binary(tmp_path: Path) -> None:
    Image.new("L", (8, 6), 100).save(tmp_path / "l.png")
    Image.new("1", (8, 6), 1).save(tmp_path / "one.png")
    im = load_image(tmp_path / "l.png")
    _check_rgb(im, (8, 6))
    assert im.getpixel((0, 0)) == (100, 100, 100)
    assert load_image(tmp_path / "one.png").getpixel((0, 0)) == WHITE


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, 5, 10))  # left half red, right half index 0 (transparent black)
    im.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    _check_rgb(out, (10, 10))
    assert out.getpixel((1, 1)) == RED
    assert out.getpixel((8, 8)) == WHITE  # transparent -> white, not black


def test_palette_with_rgba_palette() -> None:
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 4, 8))
    pal = im.quantize(colors=4, method=Image.Quantize.FASTOCTREE)
    assert pal.mode == "P" and pal.palette.mode == "RGBA"
    out = to_rgb(pal)
    assert out.getpixel((1, 1)) == BLUE and out.getpixel((6, 6)) == WHITE


def test_la_and_rgba_composited_onto_white(tmp_path: Path) -> None:
    la = Image.new("LA", (6, 6), (0, 0))  # fully transparent black
    la.putpixel((0, 0), (0, 255))  # one opaque black pixel
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    _check_rgb(out, (6, 6))
    assert out.getpixel((3, 3)) == WHITE
    assert out.getpixel((0, 0)) == (0, 0, 0)
    Image.new("RGBA", (4, 4), (0, 0, 255, 128)).save(tmp_path / "rgba.png")
    assert _close(load_image(tmp_path / "rgba.png").getpixel((1, 1)), (127, 127, 255), 2)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    _check_rgb(out, (16, 16))
    assert _close(out.getpixel((8, 8)), RED, 20)


def test_exif_orientation_6_swaps_width_and_height(tmp_path: Path) -> None:
    src = Image.new("RGB", (40, 20), BLUE)
    src.paste(RED, (0, 0, 8, 8))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    src.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    _check_rgb(out, (20, 40))
    assert _close(out.getpixel((17, 2)), RED, 30)  # top-left went to top-right
    assert _close(out.getpixel((2, 2)), BLUE, 30)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "i16.png"))
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[1, 0, 0] == 128
    assert out[1, 1, 0] == 4  # 1000 / 257, not clipped to 255


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (12, 9), RED), Image.new("RGB", (12, 9), BLUE)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "a.gif") as raw:
        assert raw.n_frames == 2
    out = load_image(tmp_path / "a.gif")
    _check_rgb(out, (12, 9))
    assert _close(out.getpixel((3, 3)), RED)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (12, 9), BLUE), Image.new("RGB", (12, 9), RED)]
    frames[0].save(
        tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True
    )
    out = load_image(tmp_path / "a.webp")
    _check_rgb(out, (12, 9))
    assert _close(out.getpixel((3, 3)), BLUE)


def test_bytes_and_file_objects(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), RED).save(buf, format="PNG")
    data = buf.getvalue()
    _check_rgb(load_image(data), (5, 4))
    _check_rgb(load_image(io.BytesIO(data)), (5, 4))
    (tmp_path / "f.png").write_bytes(data)
    with open(tmp_path / "f.png", "rb") as fh:
        _check_rgb(load_image(fh), (5, 4))
    _check_rgb(load_image(str(tmp_path / "f.png")), (5, 4))


def _make_bad(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.png"
    if kind == "empty":
        (tmp_path / "empty.png").write_bytes(b"")
        return tmp_path / "empty.png"
    if kind == "text":
        (tmp_path / "notes.txt").write_text("hello\nworld\n")
        return tmp_path / "notes.txt"
    return tmp_path  # a directory


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "file not found"),
        ("empty", "file is empty"),
        ("text", "not an image file"),
        ("dir", "is a directory"),
    ],
)
def test_errors_name_the_file(tmp_path: Path, kind: str, message: str) -> None:
    path = _make_bad(tmp_path, kind)
    with pytest.raises(DataError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cut\.png: truncated or corrupt"):
        load_image(path)


def test_empty_bytes_and_name() -> None:
    with pytest.raises(DataError, match="upload.jpg: input is empty"):
        load_image(b"", name="upload.jpg")
    with pytest.raises(DataError, match="<bytes>: not an image"):
        load_image(b"definitely not an image")


def test_pixel_limit_checked_before_decoding(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100), RED).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError, match="200x100 = 20000 pixels"):
        load_image(tmp_path / "big.png", max_pixels=19_999)
    assert load_image(tmp_path / "big.png", max_pixels=20_000).size == (200, 100)
    # Headers claiming huge sizes: rejected without decoding (there are no pixel data).
    with pytest.raises(ImageTooLargeError):
        load_image(_png_header_only(50_000, 50_000), name="bomb.png")
    assert issubclass(ImageTooLargeError, DataError)


def test_pillow_bomb_error_and_warning_become_too_large() -> None:
    # Pillow raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS (~179 M) at open time...
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        load_image(_png_header_only(20_000, 20_000), max_pixels=10**12, name="bomb.png")
    # ... and warns above MAX_IMAGE_PIXELS (~89 M): the warning is turned into the error too.
    with pytest.raises(ImageTooLargeError, match="warn.png"):
        load_image(_png_header_only(10_000, 10_000), max_pixels=10**12, name="warn.png")


def test_preprocess_shape_values_and_determinism() -> None:
    im = Image.new("RGB", (300, 200), RED)
    x = preprocess(im, size=64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    expected = (np.array([1.0, 0.0, 0.0], dtype=np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[:, 10, 10], expected, rtol=1e-5)
    np.testing.assert_array_equal(x, preprocess(im, size=64))
    assert preprocess(Image.new("L", (10, 30), 0), size=8, crop=True).shape == (3, 8, 8)


def test_resize_keeps_whole_image_and_crop_takes_centre() -> None:
    im = Image.new("RGB", (200, 100), BLUE)
    im.paste(RED, (0, 0, 40, 100))  # red band on the left fifth
    full = resize_image(im, 50)
    crop = resize_image(im, 50, crop=True)
    assert full.shape == crop.shape == (50, 50, 3) and full.dtype == np.uint8
    assert tuple(full[25, 2]) == RED  # resize keeps the border content
    assert tuple(crop[25, 2]) == BLUE  # centre crop cuts it away
    with pytest.raises(ValueError):
        normalize(np.zeros((4, 4), dtype=np.uint8))


def test_shared_real_images_load_to_rgb() -> None:
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"shared images not present at {SHARED_IMAGES}")
    files = sorted(p for p in SHARED_IMAGES.iterdir() if p.is_file())
    assert files, f"no files in {SHARED_IMAGES}"
    for path in files:
        im = load_image(path)
        assert im.mode == "RGB" and im.width > 0 and im.height > 0, path
        assert preprocess(im, size=32).shape == (3, 32, 32)
