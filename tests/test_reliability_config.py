"""Bad configurations fail at start-up with one line that names the key and the fix.

Generic strictness (unknown key, wrong type, bad literal) is shown on a toy dataclass in
``tests/test_config.py::test_bad_config_names_the_key``; the global-batch message in
``tests/test_engine_units.py::test_accumulation_is_derived_from_the_global_batch``. Here: the
real experiment configs, model names and spaCy pipelines (a SLURM allocation that does not divide
the global batch is launched through srun in
``tests/test_slurm_launch.py::test_slurm_allocation_that_does_not_divide_the_global_batch_is_one_line``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bimac.config import ConfigError
from bimac.data import TokenizerConfig, build_tokenizer
from bimac.tasks.pretrain import load_pretrain_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.lrr=0.1", "unknown config key train.lrr; valid keys here: "),
        ("data.batchsize=4", "unknown config key data.batchsize"),
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("train.zero_stage=4", "train.zero_stage: 4 is not one of [1, 2, 3]"),
        ("train.betas=[0.9]", "train.betas: expected 2 items, got 1"),
        ("model.freeze=[vision]", "freeze: unknown part ['vision']; choose from"),
        ("model.image_size=96", "model.image_size=96 != data.image_size=64"),
    ],
)
def test_experiment_config_errors_name_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_pretrain_config(TINY, [override])
    assert names in _one_line(err)


def test_missing_spacy_pipeline_is_refused_before_the_workers_start(tmp_path):
    from bimac.data import DataConfig, make_loader

    (tmp_path / "00000.tar").write_bytes(b"")
    cfg = DataConfig(train_shards=str(tmp_path / "00000.tar"), noun_source="spacy",
                     spacy_pipeline="xx_no_such_pipeline", num_workers=2)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        make_loader(cfg, tokenizer=None, rank=0, world_size=1)  # before any shard is read
    msg = _one_line(err)
    assert msg.startswith("data.spacy_pipeline: spaCy pipeline 'xx_no_such_pipeline'")
    assert "python -m spacy download xx_no_such_pipeline" in msg


@pytest.mark.parametrize(
    "cfg, names",
    [
        (TokenizerConfig(kind="open_clip", name="ViT-Nope"), "tokenizer.name='ViT-Nope' is not"),
        (TokenizerConfig(kind="transformers", name=""), "tokenizer.name is empty"),
        (TokenizerConfig(kind="world", path="/nonexistent/tokenizer.json"), "python -m shards"),
    ],
)
def test_missing_tokenizer_name_or_file(cfg, names):
    with pytest.raises((ConfigError, FileNotFoundError)) as err:
        build_tokenizer(cfg)
    assert names in _one_line(err)


def test_missing_pretrained_model_name():
    from bimac.models.bimac import BiMAC, BiMACConfig

    with pytest.raises(ConfigError) as err:
        BiMAC(BiMACConfig(pretrained="no_such_tag_s13b"))
    assert "pretrained: 'no_such_tag_s13b' is neither a file nor an open_clip tag" in _one_line(err)
