"""`--weights` -> a DeepEncoderModel: `random`, a `save_pretrained` directory of this library, or any checkpoint
holding the whole tower (DeepSeek-OCR, transformers' UnlimitedOcr port; local directory / file or hub id)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..configuration_deepencoder import DeepEncoderConfig
from ..conversion.io import CheckpointError
from ..conversion.load import load_tower
from ..modeling_deepencoder import DeepEncoderModel

DEFAULT_WEIGHTS = "deepseek-ai/DeepSeek-OCR"
RANDOM = "random"


class WeightsError(RuntimeError):
    """The weights cannot be loaded; the message is one sentence saying what to pass instead."""


def is_save_pretrained_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == DeepEncoderConfig.model_type
    except (OSError, json.JSONDecodeError):
        return False


def load_config(config: str | os.PathLike | DeepEncoderConfig | None) -> DeepEncoderConfig:
    """None -> the released architecture; a DeepEncoderConfig; a config.json file or a directory holding one."""
    if config is None:
        return DeepEncoderConfig()
    if isinstance(config, DeepEncoderConfig):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return DeepEncoderConfig.from_json_file(str(path))
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read config {config} ({error})") from error


def load_model(
    weights: str | os.PathLike = DEFAULT_WEIGHTS,
    config: str | os.PathLike | DeepEncoderConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[DeepEncoderModel, str]:
    """Returns (model in eval mode, a short description of where its weights came from).

    `random` initialises `config` (default: the released architecture) from `seed`, identically in every process.
    """
    weights = os.fspath(weights)
    if weights == RANDOM:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = DeepEncoderModel(load_config(config))
        finally:
            torch.random.set_rng_state(generator_state)
        description = f"RANDOM weights (seed {seed}): outputs are meaningless, for trying the pipeline only"
    elif is_save_pretrained_dir(weights):
        model = DeepEncoderModel.from_pretrained(weights)
        description = f"deepencoder checkpoint {weights}"
    else:
        try:
            model, _ = load_tower(weights)
        except CheckpointError as error:
            message = str(error)
            if "pass its local directory" not in message:
                message += (
                    "; pass --weights with a local DeepSeek-OCR directory, a `deepencoder convert` output, or `random`"
                )
            raise WeightsError(message) from error
        description = f"converted checkpoint {weights} (vision tensors only)"
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), description
