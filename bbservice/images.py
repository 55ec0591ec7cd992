"""Image loading and preprocessing for captioning, with numpy and Pillow only (no torch).

`load_image` turns any file Pillow opens into one RGB image, or raises a one-line
`DataError` naming the file and the problem. `preprocess` turns that image into the
normalised float32 array a captioning encoder takes.

Decisions
---------
* Transparency is composited onto white; animated images give their first frame; EXIF
  orientation is applied; 16-bit and 32-bit greyscale are scaled (not clipped) to 8 bits.
  No colour management: embedded ICC profiles are ignored.
* `preprocess` resizes the whole image to ``size x size`` (aspect ratio not kept) by default,
  so that nothing a caption mentions near a border is cropped away. ``crop=True`` gives the
  ImageNet-style alternative: shorter side to ``size``, then a centre crop.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bbservice.errors import DataError, TooLargeError, first_line

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTooLargeError",
    "load_image",
    "normalize",
    "preprocess",
    "resize_image",
    "to_rgb",
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


class ImageTooLargeError(TooLargeError):
    """The image has more pixels than allowed (possible decompression bomb); HTTP 413."""


def _read_source(source: ImageSource, name: str | None) -> tuple[bytes | Path, str]:
    """Return (bytes or an existing file's path, label for messages)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise DataError(f"{label}: file not found")
        if path.is_dir():
            raise DataError(f"{label}: is a directory, not an image file")
        try:
            if path.stat().st_size == 0:
                raise DataError(f"{label}: file is empty (0 bytes)")
        except OSError as exc:
            raise DataError(f"{label}: cannot read file ({exc.strerror or exc})") from exc
        return path, label
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        label = name or "<bytes>"
    elif hasattr(source, "read"):
        label = name or str(getattr(source, "name", "<stream>"))
        try:
            data = source.read()
        except OSError as exc:
            raise DataError(f"{label}: cannot read stream ({exc})") from exc
        if not isinstance(data, bytes | bytearray):
            raise DataError(f"{label}: stream must be opened in binary mode")
        data = bytes(data)
    else:
        raise DataError(f"{name or '<input>'}: expected a path, bytes or a binary file object")
    if not data:
        raise DataError(f"{label}: input is empty (0 bytes)")
    return data, label


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """Scale an integer or float single-channel image (I;16*, I, F) to mode "L"."""
    arr = np.asarray(image)
    if image.mode == "F":
        arr = arr.astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        out = np.clip(arr * scale, 0, 255)
    else:
        arr = arr.astype(np.int64)
        is16 = image.mode.startswith("I;16") or arr.max(initial=0) > 255
        out = np.clip(arr, 0, 65535) / 257.0 if is16 else np.clip(arr, 0, 255)
    return Image.fromarray(np.rint(out).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to RGB; transparency is composited onto white.

    Parameters
    ----------
    image : PIL.Image.Image
        Already loaded image, any mode.

    Returns
    -------
    PIL.Image.Image
        Mode "RGB", same size.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit_grey(image)
    has_alpha = "A" in image.getbands() or "a" in image.getbands()
    if image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA":
        has_alpha = True
    if has_alpha or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: ImageSource, *, max_pixels: int = 40_000_000, name: str | None = None
) -> Image.Image:
    """Load one image as RGB (first frame, EXIF orientation applied, alpha on white).

    Parameters
    ----------
    source : path, bytes or binary file object
        The image. A file object is read to its end.
    max_pixels : int
        Largest width * height accepted; checked from the header before any pixel is decoded.
    name : str, optional
        Name used in error messages instead of the path.

    Returns
    -------
    PIL.Image.Image
        Mode "RGB", size (W, H) after EXIF rotation, detached from any file.

    Raises
    ------
    ImageTooLargeError
        More than ``max_pixels`` pixels, or Pillow's decompression-bomb check fired.
    DataError
        Missing or empty file, not an image, truncated or corrupt data, unsupported mode.
    """
    data, label = _read_source(source, name)
    fp: Path | io.BytesIO = data if isinstance(data, Path) else io.BytesIO(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{label}: image is {width}x{height} = {width * height} pixels, "
                        f"more than the limit of {max_pixels}"
                    )
                im.seek(0)
                im.load()
                try:
                    frame = ImageOps.exif_transpose(im)
                except Exception:  # corrupt EXIF: keep the pixels as stored
                    frame = im.copy()
                try:
                    return to_rgb(frame)
                except (ValueError, OSError) as exc:
                    raise DataError(f"{label}: unsupported image mode {frame.mode!r}") from exc
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"{label}: too many pixels ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise DataError(
                f"{label}: not an image file Pillow can read (unknown format or cut-off header)"
            ) from exc
        except FileNotFoundError as exc:
            raise DataError(f"{label}: file not found") from exc
        except MemoryError as exc:
            raise ImageTooLargeError(f"{label}: not enough memory to decode the image") from exc
        except Exception as exc:  # Pillow plugins raise many types on corrupt data
            raise DataError(f"{label}: truncated or corrupt image ({first_line(exc)})") from exc


def resize_image(image: Image.Image, size: int = 224, *, crop: bool = False) -> np.ndarray:
    """Resize to a square uint8 array.

    Parameters
    ----------
    image : PIL.Image.Image
        Any mode; converted with `to_rgb` first.
    size : int
        Output side length.
    crop : bool
        False: resize the whole image to (size, size), ignoring aspect ratio.
        True: shorter side to ``size`` then centre crop.

    Returns
    -------
    np.ndarray
        uint8, shape (size, size, 3).
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    image = to_rgb(image)
    if crop:
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def normalize(array: np.ndarray) -> np.ndarray:
    """ImageNet mean/std normalisation of a uint8 RGB array.

    Parameters
    ----------
    array : np.ndarray
        uint8, shape (H, W, 3).

    Returns
    -------
    np.ndarray
        float32, shape (3, H, W).
    """
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {array.shape}")
    x = array.astype(np.float32) / np.float32(255.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess(image: Image.Image, size: int = 224, *, crop: bool = False) -> np.ndarray:
    """Resize (see `resize_image`) and normalise one image for the encoder.

    Parameters
    ----------
    image : PIL.Image.Image
        Any mode.
    size : int
        Output side length.
    crop : bool
        Centre crop instead of a direct resize.

    Returns
    -------
    np.ndarray
        float32, shape (3, size, size), ImageNet-normalised.
    """
    return normalize(resize_image(image, size, crop=crop))
