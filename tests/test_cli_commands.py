"""The `bimac` command: every subcommand's --help, and the tools on a random-weight export."""

from __future__ import annotations

import json

import pytest
import tomllib
from finetune_fixtures import SMALL, random_export, world_image, world_shards
from PIL import Image

import cli
from bimac.tools.ground import DISPLAY_SIDE

HELP = [[name] for name in cli.COMMANDS if name not in cli.STAGES]
HELP += [[cmd, stage] for cmd, stages in cli.STAGES.items() for stage in stages]
OWN_TOOLS = ["caption", "classify", "retrieve", "ground", "export", "report"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _, tok = world_shards(root / "world", n=8)
    return random_export(root / "export", tok, SMALL)


def test_console_script_is_declared():
    with open("pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["bimac"] == "cli:main"


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_every_subcommand_help_works(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage" in text.lower() and "--" in text
    if argv[0] in OWN_TOOLS:  # our tools state each option's default
        assert "default" in text


def test_top_level_help_lists_commands_and_bad_commands_fail(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "nonsense"])
    assert exit_info.value.code == 2


def test_ground_writes_one_readable_png_per_noun(export, tmp_path):
    image = world_image(tmp_path / "scene.png", size=(120, 90))
    cli.main(
        [
            "ground",
            str(image),
            "a red circle left of two blue squares",
            "--checkpoint",
            str(export),
            "--out-dir",
            str(tmp_path / "g"),
            "--nouns",
            "world",
        ]
    )
    meta = json.loads((tmp_path / "g" / "grounding.json").read_text())
    assert [n["noun"] for n in meta["nouns"]] == ["circle", "squares"]
    for noun in meta["nouns"]:
        png = Image.open(tmp_path / "g" / noun["png"])
        assert png.size[0] > png.size[1] >= DISPLAY_SIDE  # landscape, upscaled to be read
        assert 0.0 < noun["max"] < 1.0  # a sigmoid score
        assert 0 <= noun["best_patch"] < noun["grid"] ** 2


def test_caption_classify_retrieve(export, tmp_path, capsys):
    from bimac.tools.caption import main as caption
    from bimac.tools.classify import main as classify
    from bimac.tools.retrieve import main as retrieve

    folder = tmp_path / "imgs"
    folder.mkdir()
    images = [str(world_image(folder / f"{i}.png", index=i)) for i in range(3)]
    caps = caption(
        [
            *images,
            "--checkpoint",
            str(export),
            "--strategy",
            "greedy",
            "--max-new-tokens",
            "5",
            "--out",
            str(tmp_path / "caps.json"),
        ]
    )
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    assert len(json.loads((tmp_path / "caps.json").read_text())) == 3
    rows = classify(
        [
            images[0],
            "--checkpoint",
            str(export),
            "--labels",
            "circle,square,star",
            "--template",
            "a {}",
            "--top",
            "3",
        ]
    )
    probs = [p for _, p in rows[0]["top"]]
    assert sorted(n for n, _ in rows[0]["top"]) == ["circle", "square", "star"]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    hits = retrieve(
        [
            "--checkpoint",
            str(export),
            "--images",
            str(folder),
            "--query",
            "a red circle",
            "--top",
            "2",
        ]
    )[0]
    assert len(hits) == 2 and hits[0][1] >= hits[1][1]
    assert {h[0] for h in hits} <= set(images)


def test_export_to_open_clip_from_the_command_line(export, tmp_path):
    cli.main(
        [
            "export",
            "--checkpoint",
            str(export),
            "--to-open-clip",
            str(tmp_path / "oc"),
            "--name",
            "bimac-cli-test",
        ]
    )
    for name in (
        "bimac-cli-test.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tokenizer.json",
    ):
        assert (tmp_path / "oc" / name).is_file()


def test_report_lays_out_tables_and_embeds_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "step": 2,
                "samples": 64,
                "final_loss": 1.5,
                "final_losses": {"mcl": 1.0, "cg": 0.5},
                "wall_s": 8.0,
            }
        )
    )
    lines = [
        {
            "step": s,
            "loss": 2.0 / s,
            "losses": {"mcl": 1.0 / s, "cg": 1.0 / s},
            "metrics": {"pointing_game": 0.1 * s},
            "lr": 1e-3,
            "grad_norm": 1.0,
            "samples": 32 * s,
        }
        for s in (1, 2)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{torn")
    recall = {f"{d}_R@{k}": float(k) for d in ("i2t", "t2i") for k in (1, 5, 10)}
    (run / "eval_retrieval.json").write_text(
        json.dumps({"data": "world:retrieval:12", "before": recall, "after": recall})
    )
    test = {"BLEU-4": 12.5, "METEOR": 20.0, "CIDEr-D": 70.25, "SPICE": "unavailable"}
    (run / "eval_caption.json").write_text(
        json.dumps(
            {
                "annotations": "karpathy_test.json",
                "xe": {"eval": {"test": test, "nocaps": {**test, "CIDEr-D": 50.0}}},
            }
        )
    )
    out = tmp_path / "rep" / "report.md"
    cli.main(["report", str(run), "--out", str(out)])
    text = out.read_text()
    assert "| run | completed | 2 | 64 | 1.50 | mcl 1.000, cg 0.500 | 8.00 | 8.00 |" in text
    assert "| run/eval_retrieval/before | world:retrieval:12 | 1.00 | 5.00 | 10.00 |" in text
    assert (
        "| run/eval_caption/xe/eval | karpathy_test.json | 12.50 | 20.00 | 70.25 | "
        "unavailable | 12.50 | 20.00 | 50.00 | unavailable |" in text
    )
    assert "![training curves of run](report_plots/00_run.png)" in text
    assert Image.open(tmp_path / "rep" / "report_plots" / "00_run.png").size[0] > 100


def test_caption_reads_a_bengali_pal_export(tmp_path):
    """`bimac caption` tells a PAL export from a BiMAC one and decodes with mBART (random weights:
    only the plumbing is checked, not the language)."""
    import torch

    from bimac.config import load_config
    from bimac.tasks.caption_bn import CaptionBnConfig, CaptionBnTask
    from bimac.tools.caption import is_bimac_export
    from bimac.tools.caption import main as caption

    torch.manual_seed(0)
    cfg = load_config(CaptionBnConfig, "configs/finetune/caption_bn/tiny.yaml")
    CaptionBnTask(cfg).build_model().save_pretrained(tmp_path / "pal")
    assert not is_bimac_export(tmp_path / "pal")
    image = world_image(tmp_path / "scene.png")
    caps = caption(
        [
            str(image),
            "--checkpoint",
            str(tmp_path / "pal"),
            "--strategy",
            "greedy",
            "--max-new-tokens",
            "4",
        ]
    )
    assert len(caps) == 1 and isinstance(caps[0], str)
