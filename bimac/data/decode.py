"""The image decoder of training and evaluation: bytes -> uint8 ``size`` x ``size`` RGB.

``decode_image`` resizes the shortest side to ``size`` (bicubic with antialiasing, like PIL's and
open_clip's) and centre-crops. Two paths, chosen per image, give the same pixels' quality:

- JPEG (YCbCr or grayscale, no EXIF rotation): libjpeg-turbo through ``simplejpeg``, decoding at
  1/2, 1/4 or 1/8 scale in the DCT domain while the scaled shortest side stays >= ``size`` (as
  PIL's ``draft`` does), then ``torch.nn.functional.interpolate`` on uint8 (antialiased bicubic,
  ~2x faster than PIL's resize on this CPU; ``benchmarks/data_loader.py`` measured each option).
- everything else (PNG/WebP/GIF, whatever the file name says; CMYK/YCCK JPEG; JPEG with an EXIF
  orientation): PIL, with ``draft`` for JPEG, EXIF orientation applied, 16-bit greyscale scaled to
  8 bits (PIL's own conversion clips it), palette transparency resolved, alpha dropped.

A header claiming more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels raises
``PIL.Image.DecompressionBombError`` before any pixel is decoded; a broken image raises whatever
the library raises.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps

JPEG_SOI = b"\xff\xd8"
EXIF_MARK = b"Exif\x00\x00"
EXIF_SCAN = 65536  # EXIF must sit in an APP1 segment, which is at most 64 KiB, before the pixels
FAST_COLOURSPACES = ("YCbCr", "Gray")  # simplejpeg's names; CMYK/YCCK go through PIL


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """Width and height after resizing the shortest side of ``w`` x ``h`` to ``size``."""
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def resize_crop(pixels: np.ndarray, w: int, h: int, size: int) -> np.ndarray:
    """``pixels`` (uint8 HWC RGB, the ``w`` x ``h`` image, possibly DCT-downscaled) -> shortest
    side ``size`` by antialiased bicubic, centre crop; uint8 ``size`` x ``size`` x 3.

    The resized size comes from ``w``/``h``, not from the (scaled) decode, so every path crops
    the same window.
    """
    nw, nh = resized_size(w, h, size)
    if pixels.shape[:2] != (nh, nw):
        src = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # channels-last NCHW view
        out = torch.nn.functional.interpolate(
            src, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )
        pixels = out[0].permute(1, 2, 0).numpy()
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def _refuse_bomb(w: int, h: int) -> None:
    if w * h > Image.MAX_IMAGE_PIXELS:  # PIL itself only warns up to 2x this
        raise Image.DecompressionBombError(
            f"{w}x{h} pixels > Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}"
        )


def _dct_factor(w: int, h: int, size: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps the shortest side >= ``size`` (PIL's ``draft`` rule)."""
    factor = 1
    while factor < 8 and min(w, h) // (2 * factor) >= size:
        factor *= 2
    return factor


def _fast_jpeg(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The simplejpeg path, or None when this JPEG needs PIL (CMYK, EXIF orientation)."""
    h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    _refuse_bomb(w, h)
    if colourspace not in FAST_COLOURSPACES:
        return None
    if EXIF_MARK in data[:EXIF_SCAN] and _exif_orientation(data) != 1:
        return None
    f = _dct_factor(w, h, size)
    pixels = simplejpeg.decode_jpeg(
        data, "RGB", min_factor=f, min_height=-(-h // f), min_width=-(-w // f)
    )
    return resize_crop(pixels, w, h, size), (w, h)


def _exif_orientation(data: bytes) -> int:
    return Image.open(io.BytesIO(data)).getexif().get(ImageOps.ExifTags.Base.Orientation, 1)


def _rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HWC RGB."""
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit greyscale (PNG/TIFF)
        grey = np.asarray(img).astype(np.uint32) >> 8
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB
    return np.array(img.convert("RGB"))  # a writable copy: torch warns on read-only arrays


def _pil(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    img = Image.open(io.BytesIO(data))  # reads the header only
    _refuse_bomb(img.width, img.height)
    orientation = img.getexif().get(ImageOps.ExifTags.Base.Orientation, 1)
    swap = orientation in (5, 6, 7, 8)  # a quarter turn: the stored width is the shown height
    w, h = (img.height, img.width) if swap else img.size
    img.draft("RGB", (size, size))  # JPEG: DCT-domain downscale, shortest side stays >= size
    img = ImageOps.exif_transpose(img)
    return resize_crop(_rgb(img), w, h, size), (w, h)


def decode_image(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (uint8 ``size`` x ``size`` x 3 RGB, (width, height) as shown, i.e. after EXIF
    orientation, at full resolution: the frame object boxes refer to)."""
    if data[:2] == JPEG_SOI:
        out = _fast_jpeg(data, size)
        if out is not None:
            return out
    return _pil(data, size)
