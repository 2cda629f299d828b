"""Every entry point's user mistakes, run as the user runs them (a subprocess): one line on stderr
that names the file or key and the fix, a non-zero exit status, no traceback, nothing left behind;
``--debug`` / ``BIMAC_DEBUG=1`` show the traceback. And ``--help`` of every entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_fixtures import SMALL, random_export, world_shards

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/pretrain/tiny.yaml")
RETRIEVAL = str(REPO / "configs/finetune/retrieval/tiny.yaml")
CAPTION_BN = str(REPO / "configs/finetune/caption_bn/tiny.yaml")
CAPTION = str(REPO / "configs/finetune/caption/tiny.yaml")


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None):
    """``python -m ...`` / ``python script`` from ``cwd`` with the repository importable."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    full_env.pop("BIMAC_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An export, a run directory holding it, a DeepSpeed step directory, broken exports."""
    root = tmp_path_factory.mktemp("mistakes")
    _, tok = world_shards(root / "world", n=8)
    export = random_export(root / "run" / "export", tok, SMALL)
    step = root / "run" / "checkpoints" / "step00000010"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (root / "run" / "checkpoints" / "latest").write_text("step00000010")
    garbage = root / "garbage"
    garbage.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (garbage / name).write_bytes((export / name).read_bytes())
    truncated = root / "truncated"
    truncated.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (truncated / name).write_bytes((export / name).read_bytes())
    weights = (export / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (garbage / "model.safetensors").write_bytes(b"this is not a model")
    (root / "bad.yaml").write_text("train: {max_steps: 3\n")
    (root / "empty_dir").mkdir()
    (root / "captions.txt").write_text("")
    return root


def image(root: Path) -> str:
    from PIL import Image

    path = root / "photo.png"
    Image.new("RGB", (40, 30), "red").save(path)
    return str(path)


# id -> (argv, words the one error line must hold); {root} is the fixture folder
CASES = {
    "missing config file": (
        ["-m", "pretrain", "--config", "{root}/nope.yaml"],
        ["nope.yaml does not exist", "configs/"],
    ),
    "config is not YAML": (["-m", "pretrain", "--config", "{root}/bad.yaml"], ["not valid YAML"]),
    "no --config": (["-m", "pretrain"], ["--config", "--help"]),
    "unknown key": (
        ["-m", "pretrain", "--config", TINY, "train.max_stepz=3"],
        ["train.max_stepz", "did you mean train.max_steps"],
    ),
    "wrong type": (
        ["-m", "pretrain", "--config", TINY, "train.max_steps=abc"],
        ["train.max_steps", "expected an integer"],
    ),
    "override without =": (
        ["-m", "pretrain", "--config", TINY, "train.max_steps"],
        ["train.max_steps", "key=value"],
    ),
    "tiny config before make demo": (
        ["-m", "pretrain", "--config", TINY],
        ["data.train_shards", "runs/demo", "working directory", "make demo"],
    ),
    "world tokenizer missing": (
        ["-m", "pretrain", "--config", TINY, "data.train_shards={root}/world/00000.tar"],
        ["tokenizer.path", "make demo"],
    ),
    "shard pattern matches nothing": (
        [
            "-m",
            "pretrain",
            "--config",
            TINY,
            "data.train_shards={root}/none-*.tar",
            "train.output_dir={root}/failed_run",
        ],
        ["data.train_shards", "matches no shard"],
    ),  # fmt: skip
    "finetune init is missing": (
        ["-m", "finetune.retrieval", "--config", RETRIEVAL, "init={root}/nothing"],
        ["init:", "does not exist"],
    ),
    "finetune init is a run directory": (
        ["-m", "finetune.retrieval", "--config", RETRIEVAL, "init={root}/run"],
        ["init:", "run directory", "{root}/run/export"],
    ),
    "caption_bn eval-only export is missing": (
        ["-m", "finetune.caption_bn", "--config", CAPTION_BN, "--eval-only", "{root}/nothing"],
        ["--eval-only", "does not exist"],
    ),
    "caption_bn unknown architecture": (
        ["-m", "finetune.caption_bn", "--config", CAPTION_BN, "model.architecture=lstm"],
        ["model.architecture", "'lstm' is not one of", "vit_gpt2", "cnn_lstm"],
    ),
    "checkpoint is a DeepSpeed step": (
        ["-m", "cli", "caption", "{image}", "--checkpoint", "{root}/run/checkpoints/step00000010"],
        ["--checkpoint", "DeepSpeed", "{root}/run/export"],
    ),
    "checkpoint is a run directory": (
        ["-m", "cli", "classify", "{image}", "--checkpoint", "{root}/run", "--labels", "a,b"],
        ["--checkpoint", "run directory", "{root}/run/export"],
    ),
    "garbage model.safetensors": (
        ["-m", "cli", "classify", "{image}", "--checkpoint", "{root}/garbage", "--labels", "a,b"],
        ["{root}/garbage/model.safetensors", "not a readable safetensors"],
    ),
    "truncated model.safetensors": (
        ["-m", "cli", "classify", "{image}", "--checkpoint", "{root}/truncated", "--labels", "a,b"],
        ["{root}/truncated/model.safetensors", "truncated"],
    ),
    "shards.check on a directory without shards": (
        ["-m", "shards.check", "{root}/empty_dir"],
        ["empty_dir holds no .tar shard"],
    ),
    "shards.check pattern matches nothing": (
        ["-m", "shards.check", "{root}/none-{0..3}.tar"],
        ["urls", "does not exist"],
    ),
    "verify with a missing input folder": (
        ["-m", "shards.bengali.verify", "--translated", "{root}/no_such_dir", "--out", "{root}/v"],
        ["translated:", "no_such_dir does not exist", "shards.bengali.translate"],
    ),
    "verify with no finished translate shard": (
        ["-m", "shards.bengali.verify", "--translated", "{root}/empty_dir", "--out", "{root}/v"],
        ["translated:", "no finished translate shard"],
    ),
    "pack into a source folder": (
        ["-m", "shards.bengali.pack", "--from-world", "--n", "2", "--out", str(REPO / "shards")],
        ["out:", "Python sources"],
    ),
    "translate without captions": (
        ["-m", "shards.bengali.translate", "--out", "{root}/t"],
        ["captions:", "--captions FILE"],
    ),
    "translate with a missing captions file": (
        ["-m", "shards.bengali.translate", "--captions", "{root}/none.json", "--out", "{root}/t"],
        ["captions:", "none.json does not exist"],
    ),
    "bengali stage unknown flag": (
        ["-m", "shards.bengali.pack", "--shard-sise", "3"],
        ["shard_sise", "did you mean shard_size"],
    ),
    "grid with a bad key": (
        [
            str(REPO / "slurm/submit.py"),
            "grid",
            "--grid",
            "table6",
            "--config",
            TINY,
            "train.max_stepz=1",
            "--cluster",
            "debug",
            "--out",
            "{root}/grid",
        ],
        ["train.max_stepz", "did you mean"],
    ),  # fmt: skip
    "collect an empty folder": (
        [str(REPO / "slurm/submit.py"), "collect", "--out", "{root}/empty_dir"],
        ["--out", "summary.json"],
    ),
    "world builder with an unknown split": (
        ["-m", "shards.world", "--out", "{root}/w", "--split", "nosuch"],
        ["python -m shards.world: error", "split", "'nosuch' is not one of"],
    ),
    "cc15m with a missing TSV": (
        ["-m", "shards.cc15m", "--out", "{root}/cc", "--cc3m", "{root}/nope.tsv"],
        ["python -m shards.cc15m: error", "cc3m", "nope.tsv does not exist"],
    ),
    "noun tagging of a missing folder": (
        ["-m", "shards.nouns", "{root}/no_shards"],
        ["python -m shards.nouns: error", "urls", "no_shards' (from pattern"],
    ),
    "noun tagging with a pipeline not installed": (
        ["-m", "shards.nouns", "{root}/world", "--pipeline", "en_core_web_xx"],
        ["python -m shards.nouns: error", "pipeline", "python -m spacy download en_core_web_xx"],
    ),
    "bimac finetune with a bad key": (
        ["-m", "cli", "finetune", "caption", "--config", CAPTION, "train.lr=fast"],
        ["bimac finetune caption: error", "train.lr", "expected a number"],
    ),
}


def _fill(text: str, root: Path, img: str) -> str:
    return text.replace("{root}", str(root)).replace("{image}", img)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_user_mistake_is_one_line_naming_the_fix(case, world, tmp_path):
    argv, words = CASES[case]
    img = image(tmp_path)
    proc = run([_fill(a, world, img) for a in argv], cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing the user reads
    for word in words:
        assert _fill(word, world, img) in errors[0], errors[0]
    # a failed start leaves no run behind: no output folder, no wandb/ or metrics anywhere
    assert not (world / "failed_run").exists() and not (world / "grid").exists()
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--debug", "BIMAC_DEBUG=1"])
def test_debug_shows_the_traceback(how, tmp_path):
    argv = ["-m", "pretrain", "--config", TINY, "train.max_stepz=3"]
    env = {"BIMAC_DEBUG": "1"} if how == "BIMAC_DEBUG=1" else None
    proc = run(argv + (["--debug"] if how == "--debug" else []), tmp_path, env)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError: unknown config key" in proc.stderr


# entry point -> its program name in usage lines, and a key --help must describe
HELP = {
    ("-m", "pretrain"): ("python -m pretrain", "train.max_steps: int = 0"),
    ("-m", "finetune.retrieval"): ("python -m finetune.retrieval", "eval.limit: int = 0  # "),
    ("-m", "finetune.caption"): ("python -m finetune.caption", "scst.samples: int = 5  # "),
    ("-m", "finetune.classification"): ("python -m finetune.classification", "mode: {"),
    ("-m", "finetune.caption_bn"): ("python -m finetune.caption_bn", "losses.tau: float = 1.0"),
    ("-m", "shards.bengali.translate"): ("python -m shards.bengali.translate", "shard_index: "),
    ("-m", "shards.bengali.verify"): ("python -m shards.bengali.verify", "tau: float = 0.55"),
    ("-m", "shards.bengali.synthesise"): ("python -m shards.bengali.synthesise", "seed: int = 42"),
    ("-m", "shards.bengali.pack"): ("python -m shards.bengali.pack", "out: Path = "),
    ("-m", "shards.check"): ("python -m shards.check", "--triplets"),
    ("-m", "shards.world"): ("python -m shards.world", "shard_size: int = 1000"),
    ("-m", "shards.cc15m"): ("python -m shards.cc15m", 'nouns: str = "en_core_web_sm"'),
    ("-m", "shards.nouns"): ("python -m shards.nouns", "--processes"),
    (str(REPO / "slurm/submit.py"),): ("python slurm/submit.py", "--cluster"),
    ("-m", "cli", "eval", "retrieval"): ("bimac eval retrieval", "--checkpoint"),
    ("-m", "cli", "finetune", "caption_bn"): ("bimac finetune caption_bn", "losses.rho: float"),
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(HELP), ids=" ".join)
def test_help_names_the_program_and_describes_the_keys(entry, tmp_path):
    prog, key = HELP[entry]
    # -h as well where hand-written parsing once took it for an override
    for flag in ("--help", "-h") if "shards.bengali.translate" in entry else ("--help",):
        proc = run([*entry, flag], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith(f"usage: {prog} ")
        assert key in proc.stdout


def test_help_reads_each_key_s_comment_from_the_dataclass_source():
    from bimac.config import describe_keys
    from bimac.data import DataConfig

    lines = {line.split(":")[0].strip(): line for line in describe_keys(DataConfig)}
    assert lines["batch_size"] == "  batch_size: int = 32  # per rank"
    assert lines["kind"] == '  kind: {pairs,triplets} = "pairs"'
    # a comment on the lines above the field
    assert lines["references"].startswith("  references: bool = false  # pairs: add `references`")
    assert "for the RF reward" in lines["references"]
