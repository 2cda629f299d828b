"""Image files for the command-line tools: read upright, skip and count the unreadable ones.

Every tool reads its image files through :class:`ImageBatch`. A file that cannot be read
(missing, not an image, truncated, too many pixels) costs one line on stderr,
``bimac caption: skipped broken.jpg: truncated or corrupt image (...)``, and the tool goes on
with the rest; at the end it prints ``bimac caption: 2 of 3 images done, 1 skipped`` on stderr
and exits with status 1 only when no image could be read. Photos are read upright: the EXIF
orientation a camera records is applied (``PIL.ImageOps.exif_transpose``).
"""

from __future__ import annotations

import io
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# the --help epilog of every batch tool
BATCH_CONVENTION = textwrap.fill(
    "Unreadable image files are skipped: one line each on stderr naming the file and why, then "
    "a count ('N of M images done, K skipped'). Results go to stdout. Exit status: 0 when at "
    "least one image was processed, 1 when none could be read.",
    width=88,
)


class UnreadableImage(Exception):
    """An image file the tools cannot read; the message says why."""


def open_upright(path: str | Path) -> Image.Image:
    """The image at ``path``, fully decoded, EXIF orientation applied, RGB."""
    try:
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:  # PIL itself only warns up to 2x
                raise UnreadableImage(
                    f"{img.width}x{img.height} pixels is more than PIL.Image.MAX_IMAGE_PIXELS"
                )
            img.load()  # a truncated file fails here, not at open
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage("no such file") from None
    except IsADirectoryError:
        raise UnreadableImage("a directory, not an image file") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image format PIL can read") from None
    except Image.DecompressionBombError as exn:
        raise UnreadableImage(str(exn)) from None
    except (OSError, SyntaxError, ValueError) as exn:  # PIL's errors for broken data
        raise UnreadableImage(f"truncated or corrupt image ({exn})") from None


def checked_bytes(path: str | Path) -> bytes:
    """The file's bytes once they decode (:class:`UnreadableImage` otherwise); the shared decoder
    (:mod:`bimac.data.decode`) applies their EXIF orientation."""
    data = Path(path).read_bytes()
    open_upright(io.BytesIO(data))
    return data


def pixels(images: list[bytes], size: int) -> torch.Tensor:
    """uint8 ``[N, 3, size, size]`` through the image decoder that training and evaluation use
    (shorter side resized, centre crop)."""
    from bimac.data.samples import image_chw

    return torch.from_numpy(np.stack([image_chw(data, size) for data in images]))


class ImageBatch:
    """The image files of one tool run: the readable ones, and a one-line report per skip."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.total = 0
        self.skipped = 0

    def skip(self, path: str | Path, why: str) -> None:
        self.skipped += 1
        print(f"{self.command}: skipped {path}: {why}", file=sys.stderr, flush=True)

    def read(
        self, paths: list[str | Path], read: Callable[[str | Path], Any] = checked_bytes
    ) -> list[tuple[str, Any]]:
        """``(path, read(path))`` of every readable file, in order; the others are skipped."""
        out = []
        for path in paths:
            self.total += 1
            try:
                out.append((str(path), read(path)))
            except UnreadableImage as exn:
                self.skip(path, str(exn))
            except OSError as exn:  # e.g. permission denied while reading the bytes
                self.skip(path, exn.strerror or str(exn))
        return out

    def finish(self) -> None:
        """Print the count; exit with status 1 when nothing could be read."""
        done = self.total - self.skipped
        print(
            f"{self.command}: {done} of {self.total} images done, {self.skipped} skipped",
            file=sys.stderr,
            flush=True,
        )
        if done == 0:
            raise SystemExit(1)
