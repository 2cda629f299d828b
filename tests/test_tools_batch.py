"""The batch tools through the `bimac` console script on a random-weight export: a bad image file
is skipped with one stderr line, the rest finish, a count closes the run, and the exit status is 1
only when no image could be read; photos with an EXIF orientation are read upright."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_fixtures import SMALL, random_export, world_image, world_shards
from PIL import ExifTags, Image

from bimac.tools.images import UnreadableImage, checked_bytes, open_upright, pixels

REPO = Path(__file__).resolve().parents[1]
BIMAC = str(Path(sys.executable).with_name("bimac"))  # the console script a user runs


def bimac(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [BIMAC, *args], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )


def assert_skipped(proc, command: str, skipped: dict[str, str], total: int) -> None:
    """One stderr line per bad file naming it and why, the count last, and no traceback."""
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{command}: skipped ")]
    assert len(lines) == len(skipped), proc.stderr
    for path, why in skipped.items():
        assert any(f"skipped {path}: " in line and why in line for line in lines), proc.stderr
    done = total - len(skipped)
    count = f"{command}: {done} of {total} images done, {len(skipped)} skipped"
    assert proc.stderr.splitlines()[-1] == count
    assert proc.returncode == (0 if done else 1)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    _, tok = world_shards(root / "world", n=8)
    return random_export(root / "export", tok, SMALL)


@pytest.fixture()
def files(tmp_path):
    """Two good images, a truncated JPEG, a text file named .png and a path that is absent."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = [world_image(folder / f"good{i}.png", index=i) for i in range(2)]
    buf = io.BytesIO()
    Image.open(good[0]).save(buf, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.png").write_text("not an image")
    return {
        "good": [str(p) for p in good],
        "truncated": str(folder / "truncated.jpg"),
        "text": str(folder / "notes.png"),
        "missing": str(folder / "absent.jpg"),
        "folder": str(folder),
    }


def exif_rotated_jpeg(upright: Image.Image, path: Path) -> Path:
    """``upright`` stored as a phone held upright does: pixels turned 90° anticlockwise, EXIF
    orientation 6 ("turn 90° clockwise to display")."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # anticlockwise
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored.save(path, format="JPEG", quality=98, exif=exif.tobytes())
    return path


def test_open_upright_reasons_and_exif(files, tmp_path):
    for key, why in [
        ("truncated", "truncated or corrupt"),
        ("text", "not an image format"),
        ("missing", "no such file"),
    ]:
        with pytest.raises(UnreadableImage, match=why):
            open_upright(files[key])
    upright = Image.open(files["good"][0]).convert("RGB")  # 120 x 90, landscape
    rotated = exif_rotated_jpeg(upright, tmp_path / "phone.jpg")
    assert Image.open(rotated).size == (90, 120)  # stored portrait
    assert open_upright(rotated).size == (120, 90)
    # the model sees the upright picture (the shared decoder applies EXIF): the original's pixels
    # up to JPEG error, unlike the stored pixels without their orientation
    seen = pixels([checked_bytes(rotated)], 32).float()
    original = pixels([Path(files["good"][0]).read_bytes()], 32).float()
    stored = io.BytesIO()
    Image.open(rotated).convert("RGB").save(stored, format="PNG")  # the EXIF tag dropped
    sideways = pixels([stored.getvalue()], 32).float()
    assert (seen - original).abs().mean() < 2.0  # measured 0.68
    assert (sideways - original).abs().mean() > 10.0  # measured 35.5
    assert checked_bytes(files["good"][1]) == Path(files["good"][1]).read_bytes()


@pytest.mark.slow
def test_caption_skips_bad_files_and_captions_the_rest(export, files):
    args = [files["good"][0], files["truncated"], files["good"][1], files["missing"]]
    proc = bimac("caption", *args, "--checkpoint", str(export), "--strategy", "greedy",
                 "--max-new-tokens", "4")  # fmt: skip
    out = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    assert out == files["good"]  # both good images captioned, in order
    bad = {files["truncated"]: "truncated or corrupt", files["missing"]: "No such file"}
    assert_skipped(proc, "bimac caption", bad, total=4)


def test_caption_with_no_readable_image_fails_without_traceback(export, files):
    proc = bimac("caption", files["truncated"], files["text"], "--checkpoint", str(export))
    assert proc.stdout == ""
    bad = {files["truncated"]: "truncated or corrupt", files["text"]: "not an image format"}
    assert_skipped(proc, "bimac caption", bad, total=2)


@pytest.mark.slow
def test_classify_and_retrieve_skip_bad_files(export, files):
    proc = bimac("classify", files["text"], files["good"][1], "--checkpoint", str(export),
                 "--labels", "circle,square", "--template", "a {}")  # fmt: skip
    rows = proc.stdout.splitlines()
    assert len(rows) == 1 and rows[0].startswith(files["good"][1] + "\t")
    assert_skipped(proc, "bimac classify", {files["text"]: "not an image"}, total=2)
    proc = bimac("classify", files["good"][0], "--checkpoint", str(export))  # no --labels, no head
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"bimac classify: {export} has no fine-tuned")
    assert "give --labels" in proc.stderr

    proc = bimac("retrieve", "--checkpoint", str(export), "--images", files["folder"],
                 "--query", "a red circle", "--top", "5")  # fmt: skip
    hits = [line.split("\t")[1] for line in proc.stdout.splitlines()[1:]]
    assert sorted(hits) == files["good"]  # the search ran over every readable image
    bad = {files["truncated"]: "truncated or corrupt", files["text"]: "not an image format"}
    assert_skipped(proc, "bimac retrieve", bad, total=4)


@pytest.mark.slow
def test_ground_reads_an_exif_photo_upright_and_refuses_a_broken_one(export, files, tmp_path):
    photo = exif_rotated_jpeg(Image.open(files["good"][0]).convert("RGB"), tmp_path / "p.jpg")
    out = tmp_path / "g"
    proc = bimac("ground", str(photo), "a red circle left of two blue squares",
                 "--checkpoint", str(export), "--out-dir", str(out), "--nouns", "world")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "grounding.json").read_text())
    assert meta["image_size"] == [120, 90]  # stored 90 x 120 with EXIF orientation 6
    assert [n["noun"] for n in meta["nouns"]] == ["circle", "squares"]
    assert proc.stdout.split() == [str(out / n["png"]) for n in meta["nouns"]]

    proc = bimac("ground", files["truncated"], "a red circle", "--checkpoint", str(export))
    assert proc.stdout == ""
    assert_skipped(proc, "bimac ground", {files["truncated"]: "truncated or corrupt"}, total=1)


def test_ground_without_a_noun_names_the_pipeline_to_install(export, files):
    proc = bimac("ground", files["good"][0], "a dog runs on the beach", "--checkpoint",
                 str(export), "--nouns", "world")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "bimac ground: no noun found in 'a dog runs on the beach' by spaCy pipeline 'world' (it "
        "knows only the embedded world's shapes); for real English install en_core_web_sm: "
        "python -m spacy download en_core_web_sm"
    )


def test_report_refuses_a_directory_with_nothing_to_report(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = bimac("report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.md"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bimac report: nothing to report under {tmp_path / 'empty'}: no summary.json, "
        "metrics.jsonl or evaluation JSON; give a run's train.output_dir or the --out folder "
        "of bimac eval"
    ]
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("command", ["caption", "classify", "retrieve", "ground"])
def test_batch_help_states_the_skip_and_exit_convention(command, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"bimac.tools.{command}").main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "skipped: one line each on stderr" in text
    assert "1 when none could be read" in text
