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
APP1, SOS, EOI = 0xE1, 0xDA, 0xD9  # JPEG markers: EXIF's segment, start of scan, end of image
FAST_COLOURSPACES = ("YCbCr", "Gray")  # simplejpeg's names; CMYK/YCCK go through PIL


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """Width and height after resizing the shortest side of ``w`` x ``h`` to ``size``."""
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def resize_crop(pixels: np.ndarray, w: int, h: int, size: int) -> np.ndarray:
    """``pixels`` (uint8 HWC RGB, the ``w`` x ``h`` image, possibly DCT-downscaled) -> shortest
    side ``size`` by antialiased bicubic, centre crop; uint8 ``size`` x ``size`` x 3 (a view).

    The resized size comes from ``w``/``h``, not from the (scaled) decode, so every path crops
    the same window.
    """
    nw, nh = resized_size(w, h, size)
    if pixels.shape[:2] != (nh, nw):
        # A channels-last NCHW view. Unsqueeze before permuting: `permute(2, 0, 1).unsqueeze(0)`
        # gives the batch dimension stride 3, torch then does not see channels-last and returns
        # planar CHW, whose HWC crop costs a strided gather (~0.4 ms per 224 px image) to copy;
        # channels-last in and out, the resize is also ~20 % faster.
        src = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2)
        out = torch.nn.functional.interpolate(
            src, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )
        pixels = out[0].permute(1, 2, 0).numpy()
    top, left = (nh - size) // 2, (nw - size) // 2
    return pixels[top : top + size, left : left + size]  # a view: the batch stack copies it once


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


def _fast_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(w, h)`` of a JPEG that libjpeg-turbo/nvjpeg decode as PIL would (YCbCr or greyscale, no
    EXIF rotation); None when it needs PIL. Refuses bombs."""
    h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    _refuse_bomb(w, h)
    if colourspace not in FAST_COLOURSPACES:
        return None
    if _has_exif(data) and _exif_orientation(data) != 1:
        return None
    return w, h


def _has_exif(data: bytes) -> bool:
    """Whether a JPEG carries an APP1 ``Exif`` segment before its scan (where PIL reads EXIF).

    Walks the segment headers (a handful per file, ~2 us) rather than searching the bytes for
    the mark (~40 us on a 50 KB file). A segment chain that does not parse falls back to the
    search.
    """
    i, end = 2, len(data) - 4
    while i <= end:
        if data[i] != 0xFF:
            return EXIF_MARK in bytes(data)  # a memoryview has no `in` for bytes
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (SOS, EOI):
            return False
        if marker == APP1 and data[i + 4 : i + 10] == EXIF_MARK:
            return True
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return EXIF_MARK in bytes(data)


def _fast_jpeg(data: bytes, size: int, w: int, h: int) -> np.ndarray:
    f = _dct_factor(w, h, size)
    pixels = simplejpeg.decode_jpeg(
        data, "RGB", min_factor=f, min_height=-(-h // f), min_width=-(-w // f)
    )
    return resize_crop(pixels, w, h, size)


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
    wh = _fast_jpeg_size(data) if data[:2] == JPEG_SOI else None
    if wh is None:
        return _pil(data, size)
    return _fast_jpeg(data, size, *wh), wh


def decode_or_defer(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """For ``data.decode_on: cuda``: (the JPEG's bytes as a 1-D uint8 array, (w, h)) when the GPU
    decodes it as ``decode_image`` would, else ``decode_image``'s result (PNG, CMYK, EXIF-rotated
    JPEG: decoded here, in the loader worker)."""
    wh = _fast_jpeg_size(data) if data[:2] == JPEG_SOI else None
    if wh is None:
        return _pil(data, size)
    return np.frombuffer(bytearray(data), np.uint8), wh  # writable: torch warns otherwise


def decode_batch(batch: dict, size: int, device: str | torch.device) -> dict:
    """``data.decode_on: cuda``, in the main process: ``image_encoded`` (and ``image_syn_encoded``;
    lists of 1-D JPEG bytes or HWC pixels from ``decode_or_defer``) -> ``image`` (``image_syn``),
    uint8 ``[B, 3, size, size]`` channels-last on ``device``, as the CPU path gives them. JPEGs are
    decoded in one batched ``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA), resized there by
    antialiased bicubic in float32."""
    import torchvision.io

    for key in ("image", "image_syn"):
        encoded = batch.pop(f"{key}_encoded", None)
        if encoded is None:
            continue
        out = torch.empty((len(encoded), size, size, 3), dtype=torch.uint8, device=device)
        jpegs = [i for i, t in enumerate(encoded) if t.dim() == 1]
        rgb = torchvision.io.ImageReadMode.RGB
        decoded = torchvision.io.decode_jpeg([encoded[i] for i in jpegs], mode=rgb, device=device)
        for i, chw in zip(jpegs, decoded if jpegs else []):
            h, w = chw.shape[1:]
            nw, nh = resized_size(w, h, size)
            resized = torch.nn.functional.interpolate(
                chw.unsqueeze(0).float(), size=(nh, nw), mode="bicubic", antialias=True
            )[0]
            top, left = (nh - size) // 2, (nw - size) // 2
            crop = resized[:, top : top + size, left : left + size]
            out[i] = crop.round_().clamp_(0, 255).permute(1, 2, 0).to(torch.uint8)
        for i, t in enumerate(encoded):
            if t.dim() == 3:
                out[i] = t.to(device)
        batch[key] = out.permute(0, 3, 1, 2)
    return batch
