"""shards.cc15m: TSV handling, sizes.json, and img2dataset end to end against a local server."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from bimac.data import DataConfig, TokenizerConfig, build_tokenizer, make_loader
from shards.cc15m import DEFAULT_VENV, build, normalise_tsv


def test_normalise_tsv_both_column_orders(tmp_path):
    (tmp_path / "cc3m.tsv").write_text(
        "a red car\thttp://h/1.jpg\n"
        "no url here\tftp://h/2.jpg\n"
        "\thttp://h/3.jpg\n"
        "two   dogs\thttps://h/4.jpg\n"
    )
    (tmp_path / "cc12m.tsv").write_text('http://h/5.jpg\ta "quoted" cat\nhttp://h/6.jpg\n')
    assert normalise_tsv(tmp_path / "cc3m.tsv", tmp_path / "a.tsv") == {
        "rows": 2,
        "dropped_rows": 2,
    }
    assert (tmp_path / "a.tsv").read_text().splitlines() == [
        "url\tcaption", "http://h/1.jpg\ta red car", "https://h/4.jpg\ttwo dogs",
    ]  # fmt: skip
    assert normalise_tsv(tmp_path / "cc12m.tsv", tmp_path / "b.tsv") == {
        "rows": 1,
        "dropped_rows": 1,
    }
    assert (tmp_path / "b.tsv").read_text().splitlines()[1] == 'http://h/5.jpg\t"a ""quoted"" cat"'


class _Images(BaseHTTPRequestHandler):
    def do_GET(self):  # /ok/N.jpg -> a JPEG, /broken/N.jpg -> garbage, anything else -> 404
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "ok":
            buf = io.BytesIO()
            Image.new("RGB", (120, 80), (int(name.split(".")[0]) * 20, 90, 30)).save(
                buf, format="JPEG"
            )
            body = buf.getvalue()
        elif kind == "broken":
            body = b"this is not an image"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEFAULT_VENV.expanduser() / "bin" / "img2dataset").exists(),
    reason="img2dataset venv absent: create it once with `python -m shards.cc15m --setup` (PyPI)",
)
def test_img2dataset_end_to_end_against_local_server(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        cc3m = [f"cc3m circle {i}\t{base}/ok/{i}.jpg" for i in range(6)] + [f"gone\t{base}/missing/{i}.jpg" for i in range(2)]  # fmt: skip
        cc12m = [f"{base}/ok/{i}.jpg\tcc12m two squares {i}" for i in range(5)] + [f"{base}/broken/0.jpg\tbroken"]  # fmt: skip
        (tmp_path / "cc3m.tsv").write_text("\n".join(cc3m) + "\n")
        (tmp_path / "cc12m.tsv").write_text("\n".join(cc12m) + "\n")
        out = tmp_path / "out"
        report = build(
            out, {"cc3m": tmp_path / "cc3m.tsv", "cc12m": tmp_path / "cc12m.tsv"},
            nouns="world", processes=1, threads=4, shard_size=4, image_size=64, timeout=5,
        )  # fmt: skip
    finally:
        server.shutdown()
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == report
    assert sizes["cc3m"]["samples"] == 6 and sizes["cc3m"]["failed_to_download"] == 2
    assert sizes["cc12m"]["samples"] == 5 and sizes["cc12m"]["failed_to_resize"] == 1
    assert sizes["cc3m"]["check"]["skipped_total"] == 0
    # every downloaded caption tagged once, here: one noun each ("circle", "squares")
    for name, n in (("cc3m", 6), ("cc12m", 5)):
        assert sizes[name]["input"]["nouns"]["captions_tagged"] == sizes[name]["input"]["nouns"]["nouns"] == n  # fmt: skip
    # both sources through the trainer's loader: keys collide, url#key does not
    tok = build_tokenizer(TokenizerConfig(kind="open_clip", name="ViT-B-32", context_length=16))
    cfg = DataConfig(
        train_shards=f"{out}/cc3m/*.tar::{out}/cc12m/*.tar", batch_size=16, image_size=32
    )
    (batch,) = list(make_loader(cfg, tok, rank=0, world_size=1))
    keys = [s.split("#")[1] for s in batch["sample_id"]]
    assert len(batch["sample_id"]) == len(set(batch["sample_id"])) == 11 and len(set(keys)) < 11
    texts = {t.replace(" ", "") for t in tok.decode(batch["text"])}  # CLIP BPE splits digits
    assert texts == {f"cc3mcircle{i}" for i in range(6)} | {f"cc12mtwosquares{i}" for i in range(5)}
    # the loader (noun_source: json) reads each tagged noun: its span decodes to the noun
    spans = batch["noun_spans"][batch["noun_mask"]].tolist()
    rows = batch["noun_mask"].nonzero()[:, 0].tolist()
    nouns = [
        tok.decode([batch["text"][r, s:e].tolist()])[0].strip() for r, (s, e) in zip(rows, spans)
    ]
    assert sorted(nouns) == ["circle"] * 6 + ["squares"] * 5
