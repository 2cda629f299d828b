"""The image decoder (``bimac.data.decode``): pixels vs full decode + bicubic, EXIF orientation,
odd formats, bombs refused from the header."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from bimac.data.decode import _has_exif, decode_image, resized_size
from shards.photos import photo_sample, source_photos

SIZE = 224


@pytest.fixture(scope="module")
def photos():
    return list(source_photos().values())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _crop(img: Image.Image, size: int = SIZE) -> np.ndarray:
    nw, nh = resized_size(*img.size, size)
    out = np.asarray(img.resize((nw, nh), Image.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[top : top + size, left : left + size]


def _full(data: bytes) -> np.ndarray:
    """The reference: PIL full-resolution decode, EXIF orientation, RGB, bicubic, centre crop."""
    return _crop(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _draft(data: bytes) -> np.ndarray:
    """Today's loader before this decoder: PIL ``draft`` (DCT-domain downscale) + PIL bicubic."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    img.draft("RGB", (SIZE, SIZE))
    nw, nh = resized_size(w, h, SIZE)
    out = np.asarray(img.convert("RGB").resize((nw, nh), Image.BICUBIC))
    top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
    return out[top : top + SIZE, left : left + SIZE]


def _encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("w", "h", "bound"),
    # photo_500 is decoded at full scale: only the resize kernel differs (torch vs PIL bicubic)
    # photo_1024 is decoded at 1/2 scale in the DCT domain (as PIL's draft): 40 dB
    [(500, 375, 60.0), (1024, 768, 40.0), (375, 500, 60.0)],
)
def test_photo_sets_match_full_decode_and_bicubic(photos, w, h, bound):
    for i in range(6):
        data = photo_sample(photos, i, w, h)["jpg"]
        image, size = decode_image(data, SIZE)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert size == (w, h)
        assert _psnr(image, _full(data)) >= bound


@pytest.mark.parametrize(("w", "h"), [(640, 480), (1793, 1345), (600, 450), (256, 256)])
def test_any_size_gives_todays_pixels(photos, w, h):
    """DCT scaling follows PIL's draft rule, so every size gets the pixels today's loader got
    (PIL draft + PIL bicubic) to within +-1-2 grey levels: >= 60 dB."""
    for i in range(3):
        data = photo_sample(photos, i, w, h)["jpg"]
        assert _psnr(decode_image(data, SIZE)[0], _draft(data)) >= 60.0


def _oriented(orientation: int) -> bytes:
    """A 96x64 JPEG whose corners differ (red top-left, blue bottom-left...), EXIF-tagged."""
    arr = np.zeros((64, 96, 3), np.uint8)
    arr[:32, :48] = (255, 0, 0)
    arr[32:, :48] = (0, 0, 255)
    arr[:32, 48:] = (0, 255, 0)
    exif = Image.Exif()
    exif[ImageOps.ExifTags.Base.Orientation] = orientation
    return _encode(arr, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    data = _oriented(orientation)
    image, (w, h) = decode_image(data, 48)  # no DCT scaling at 48 px: compare kernels only
    assert (w, h) == ((64, 96) if orientation >= 5 else (96, 64))
    assert _psnr(image, _crop(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), 48)) >= 50
    if orientation != 1:  # the tag was honoured, not ignored
        assert _psnr(image, decode_image(_oriented(1), 48)[0]) < 20.0


@pytest.mark.parametrize("icc_kb", [0, 100])
@pytest.mark.parametrize("orientation", [None, 1, 6])
def test_exif_is_found_where_pil_reads_it(orientation, icc_kb):
    # reference: PIL's JPEG parser (`info["exif"]`); a 100 KB ICC profile puts the pixels, and
    # perhaps the EXIF segment, past the first 64 KB
    arr = np.zeros((64, 96, 3), np.uint8)
    arr[:32, :48] = (255, 0, 0)
    kw = {"icc_profile": bytes(range(256)) * (icc_kb * 4)} if icc_kb else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ImageOps.ExifTags.Base.Orientation] = orientation
        kw["exif"] = exif.tobytes()
    data = _encode(arr, quality=95, **kw)
    assert _has_exif(data) == ("exif" in Image.open(io.BytesIO(data)).info)
    assert _has_exif(data) == (orientation is not None)
    image, (w, h) = decode_image(data, 48)
    assert (w, h) == ((64, 96) if orientation == 6 else (96, 64))
    assert _psnr(image, _crop(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), 48)) >= 50


def test_exif_search_falls_back_on_a_broken_segment_chain():
    data = _oriented(6)
    broken = data[:2] + b"\x00" + data[3:]  # the first segment no longer starts with 0xFF
    assert _has_exif(broken) and not _has_exif(_encode(np.zeros((8, 8, 3), np.uint8)))
    assert _has_exif(memoryview(broken)) and _has_exif(memoryview(data))  # a mapped shard's view


def _gradient(w: int = 120, h: int = 90) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_gradient()).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _palette_png(transparent: bool) -> bytes:
    img = Image.fromarray(_gradient()).convert("P", palette=Image.ADAPTIVE, colors=64)
    return _save(img, "PNG", **({"transparency": 0} if transparent else {}))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


ODD_FORMATS = {
    # name: (bytes, what the pixels must match)
    "cmyk_jpeg": (_cmyk_jpeg, lambda: _gradient()),
    "greyscale_jpeg": (
        lambda: _save(Image.fromarray(_gradient()).convert("L"), "JPEG", quality=95),
        lambda: np.asarray(Image.fromarray(_gradient()).convert("L").convert("RGB")),
    ),
    "progressive_jpeg": (
        lambda: _encode(_gradient(), quality=95, progressive=True),
        lambda: _gradient(),
    ),
    "png_named_jpg": (lambda: _encode(_gradient(), "PNG"), lambda: _gradient()),
    "webp_named_jpg": (lambda: _encode(_gradient(), "WEBP", lossless=True), lambda: _gradient()),
    "palette_png": (lambda: _palette_png(False), lambda: _gradient()),
    "palette_png_transparency": (lambda: _palette_png(True), lambda: _gradient()),
    "rgba_png": (
        lambda: _save(Image.fromarray(_gradient()).convert("RGBA"), "PNG"),
        lambda: _gradient(),
    ),
    "greyscale_16bit_png": (
        lambda: _save(Image.fromarray(_gradient()[..., 0].astype(np.uint16) * 257), "PNG"),
        lambda: np.repeat(_gradient()[..., :1], 3, axis=2),
    ),
}


@pytest.mark.parametrize("name", sorted(ODD_FORMATS))
def test_odd_formats_decode(name):
    make, expected = ODD_FORMATS[name]
    data = make()
    image, size = decode_image(data, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert size == (120, 90)
    # palettes (64 colours) and JPEG chroma subsampling cost a few dB against the exact gradient
    assert _psnr(image, _crop(Image.fromarray(expected()), 64)) >= 28.0
    # the training loader hands over views of its mapped shards: the same pixels from one
    view, view_size = decode_image(memoryview(data), 64)
    assert view_size == size and np.array_equal(view, image)


def _jpeg_claiming(w: int, h: int) -> bytes:
    """A valid small JPEG whose frame header claims ``w`` x ``h`` pixels."""
    data = bytearray(_encode(_gradient(16, 16), quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def test_jpeg_bomb_is_refused_from_its_header(monkeypatch):
    import simplejpeg

    def no_decode(*a, **k):
        raise AssertionError("decoded pixels of a bomb")

    bomb = _jpeg_claiming(60000, 60000)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", no_decode)
    monkeypatch.setattr(Image.Image, "load", no_decode)
    with pytest.raises(Image.DecompressionBombError):
        decode_image(bomb, SIZE)


@pytest.mark.parametrize("cut", [0, 2, 100, 0.5])
def test_broken_jpeg_raises(photos, cut):
    data = photo_sample(photos, 0, 500, 375)["jpg"]
    data = data[: int(len(data) * cut) if isinstance(cut, float) else cut]
    with pytest.raises(Exception):  # noqa: B017 - the loader counts any exception as bad_image
        decode_image(data, SIZE)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory, photos):
    """12 photo samples (500x375) in 2 shards, one stored as PNG (decoded in the worker)."""
    from bimac.data.tokenizer import save_world_tokenizer
    from bimac.data.writer import write_shards

    out = tmp_path_factory.mktemp("photos")
    samples = [photo_sample(photos, i, 500, 375) for i in range(12)]
    samples[3]["jpg"] = _save(Image.open(io.BytesIO(samples[3]["jpg"])), "PNG")
    write_shards(iter(samples), out, shard_size=6)
    save_world_tokenizer(out / "tokenizer.json")
    return out


def _batches(folder, decode_on: str, workers: int) -> list[dict]:
    from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
    from bimac.data.loader import _from_the_queue

    tok = build_tokenizer(TokenizerConfig(path=str(folder / "tokenizer.json"), context_length=32))
    cfg = DataConfig(
        train_shards=f"{folder}/*.tar", image_size=SIZE, batch_size=4, shuffle_buffer=0,
        decode_on=decode_on,
    )  # fmt: skip
    loader = make_loader(cfg, tok, rank=0, world_size=1, num_workers=workers)
    # the workers' chunks (a one-pass reader: one stream, chunks of batch_size, an empty end
    # chunk) as the main process receives them, before it decodes
    return [_from_the_queue(c["batch"]) for c in loader.loader if c["batch"] is not None]


def test_decode_on_cuda_plumbing_on_cpu(photo_shards, monkeypatch):
    """``data.decode_on: cuda``: workers ship JPEG bytes (the PNG as pixels), ``decode_batch``
    gives what the CPU path gives (run here with device="cpu": torchvision's batched decoder and
    float32 resize, the code the GPU runs) and the same batch contract."""
    import torch

    from bimac.data.decode import decode_batch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu = {sid: img for b in _batches(photo_shards, "cpu", 0) for sid, img in zip(b["sample_id"], b["image"])}  # fmt: skip
    deferred = _batches(photo_shards, "cuda", 1)
    assert sum(len(b["sample_id"]) for b in deferred) == 12
    kinds = [t.dim() for b in deferred for t in b["image_encoded"]]
    assert kinds.count(1) == 11 and kinds.count(3) == 1  # 11 JPEGs deferred, the PNG decoded
    for b in deferred:
        keys = set(b) - {"image_encoded"}
        out = decode_batch(b, SIZE, "cpu")
        assert set(out) == keys | {"image"}
        assert out["image"].shape == (len(b["sample_id"]), 3, SIZE, SIZE)
        assert out["image"].dtype == torch.uint8
        for sid, img in zip(b["sample_id"], out["image"]):
            # full decode + float bicubic vs DCT-free uint8 bicubic at 500x375: same pixels +-1
            assert _psnr(img.numpy(), cpu[sid].numpy()) >= 45.0


def test_decode_on_cuda_without_a_gpu_is_a_config_error(photo_shards, monkeypatch):
    import torch

    from bimac.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^data.decode_on=cuda: no CUDA device here; use "):
        _batches(photo_shards, "cuda", 0)
