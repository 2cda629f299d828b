"""The export folder: what a finished run hands to inference, evaluation and the next stage.

``<train.output_dir>/export/`` holds

- ``model.safetensors``: the weights (no pickled code runs when they load);
- ``config.yaml``: the experiment config, with at least a ``model`` section;
- the tokenizer: ``tokenizer.json`` (a ``tokenizers`` file, the world's) or ``tokenizer.txt``
  (the name of an open_clip / transformers tokenizer).

This module is the one place that knows those names. :func:`check` turns the usual mistakes (a
run directory or a DeepSpeed step directory instead of ``export/``, a missing folder, a
truncated or garbage ``model.safetensors``) into a :class:`~bimac.config.ConfigError` that says
which path to give instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from bimac.config import ConfigError, path_hint, save_config

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_NAME_FILE = "tokenizer.txt"
EXPORT_DIR = "export"  # inside a run directory (train.output_dir)


def _deepspeed_run_dir(directory: Path) -> Path | None:
    """The run directory of a DeepSpeed checkpoint folder (``checkpoints/`` or a step in it)."""
    for candidate in (directory, directory.parent):
        if (candidate / "latest").is_file() or any(candidate.glob("*model_states.pt")):
            steps = candidate if (candidate / "latest").is_file() else candidate.parent
            return steps.parent
    return None


def check(directory: str | Path, key: str = "--checkpoint") -> Path:
    """``directory`` if it is an export folder, else a ConfigError naming ``key`` and the fix."""
    d = Path(directory)
    if d.is_file() and d.name in (MODEL_FILE, CONFIG_FILE):
        raise ConfigError(f"{key}: {d} is a file; give the export folder that holds it: {d.parent}")
    if not d.is_dir():
        raise ConfigError(f"{key}: export folder {d} does not exist{path_hint(d)}")
    if (d / MODEL_FILE).is_file() and (d / CONFIG_FILE).is_file():
        return d
    if (d / EXPORT_DIR / MODEL_FILE).is_file():
        raise ConfigError(f"{key}: {d} is a run directory; give its export folder {d / EXPORT_DIR}")
    run = _deepspeed_run_dir(d)
    if run is not None:
        raise ConfigError(
            f"{key}: {d} is a DeepSpeed training checkpoint (for train.resume), not an export; "
            f"give the run's export folder {run / EXPORT_DIR}"
        )
    raise ConfigError(
        f"{key}: {d} is not an export folder (no {MODEL_FILE} and {CONFIG_FILE}); a run writes "
        f"one to <train.output_dir>/{EXPORT_DIR}"
    )


def read_config(directory: str | Path, key: str = "--checkpoint") -> dict[str, Any]:
    """The export's ``config.yaml`` as a mapping (checked to hold a ``model`` section)."""
    path = check(directory, key) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {path} is not valid YAML; export the model again") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{key}: {path} has no `model` section; is this a BiMAC export?")
    return data


def load_weights(directory: str | Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The export's weights; a truncated or foreign ``model.safetensors`` is a ConfigError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / MODEL_FILE
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as err:  # ValueError: a bad header length
        raise ConfigError(
            f"{path} is not a readable safetensors file ({' '.join(str(err).split())}): it is "
            "truncated or not a model; copy or export it again"
        ) from err


def save(directory: str | Path, state: dict[str, torch.Tensor], config: Any) -> Path:
    """Write ``model.safetensors`` (standalone CPU copies) and ``config.yaml`` (unless None)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(d / MODEL_FILE))
    if config is not None:
        save_config(config, d / CONFIG_FILE)
    return d


def save_tokenizer(directory: str | Path, tokenizer: Any) -> None:
    """``tokenizer``: a name (``tokenizer.txt``), a path to a ``tokenizer.json`` (copied as is), or
    an object with ``save(path)`` (a ``tokenizers.Tokenizer``)."""
    d = Path(directory)
    if isinstance(tokenizer, Path):
        shutil.copyfile(tokenizer, d / TOKENIZER_FILE)
    elif isinstance(tokenizer, str):
        (d / TOKENIZER_NAME_FILE).write_text(tokenizer + "\n")
    elif tokenizer is not None:
        tokenizer.save(str(d / TOKENIZER_FILE))


def tokenizer_source(directory: str | Path) -> Path | str | None:
    """What :func:`save_tokenizer` needs to copy the export's tokenizer to another export."""
    d = Path(directory)
    if (d / TOKENIZER_FILE).is_file():
        return d / TOKENIZER_FILE
    if (d / TOKENIZER_NAME_FILE).is_file():
        return (d / TOKENIZER_NAME_FILE).read_text().strip()
    return None


def load_tokenizer(directory: str | Path, context_length: int) -> Any:
    """The tokenizer saved with an export (``tokenizer.json``, or the name in ``tokenizer.txt``)."""
    from bimac.data.tokenizer import HFTokenizer, OpenCLIPTokenizer, TransformersTokenizer

    source = tokenizer_source(directory)
    if isinstance(source, Path):
        return HFTokenizer.from_file(source, context_length)
    if isinstance(source, str):
        try:
            return OpenCLIPTokenizer(source, context_length)
        except (ValueError, RuntimeError, KeyError):
            return TransformersTokenizer(source, context_length)
    raise ConfigError(
        f"{directory}: no {TOKENIZER_FILE} or {TOKENIZER_NAME_FILE} beside the model; "
        "export the model again"
    )
