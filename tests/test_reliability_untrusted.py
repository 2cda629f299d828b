"""Untrusted files: a pickle with an embedded payload is refused on every path that loads
weights, and the payload never runs. (Secrets in logs/configs/checkpoints are checked on a real
training run in ``tests/test_reliability_training.py``.)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from reliability_faults import PickledPayload

from bimac.config import save_config
from bimac.models.bimac import BiMAC, BiMACConfig


@pytest.fixture
def payload(tmp_path) -> tuple[Path, Path]:
    """A torch checkpoint that runs ``touch marker`` when unpickled (checked to really work)."""
    marker, path = tmp_path / "payload_ran", tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": PickledPayload(marker)}, path)
    torch.load(path, weights_only=False)  # the unsafe way does run it ...
    assert marker.exists()
    marker.unlink()  # ... so the tests below would see it run
    return path, marker


def test_rng_state_of_a_checkpoint_is_loaded_weights_only(payload, tmp_path, monkeypatch):
    from bimac.engine import checkpoint as ckpt

    path, marker = payload
    tag = tmp_path / "checkpoints" / "step00000002"
    (tag / "rng").mkdir(parents=True)
    path.rename(tag / "rng" / "rank0.pt")

    class Engine:  # DeepSpeed's part of the load is not under test here
        def load_checkpoint(self, *a, **k):
            return str(tag), {"step": 2}

    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load_checkpoint(Engine(), tag)
    assert not marker.exists()


def test_open_clip_checkpoint_file_is_loaded_weights_only(payload):
    path, marker = payload
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        BiMAC(BiMACConfig(pretrained=str(path)))
    assert not marker.exists()


def test_exported_model_loads_only_safetensors(payload, tmp_path):
    path, marker = payload
    export = tmp_path / "export"
    export.mkdir()
    save_config({"model": {}}, export / "config.yaml")
    path.rename(export / "pytorch_model.bin")  # a pickle where a model file is expected
    (export / "model.safetensors").write_bytes((export / "pytorch_model.bin").read_bytes())
    with pytest.raises(Exception, match="(?i)header|safetensor"):
        BiMAC.from_pretrained(export)
    assert not marker.exists()
