"""`--weights` -> a tower: `random`, a `save_pretrained` directory of this library (v1 or V2), or any checkpoint
holding a whole tower (DeepSeek-OCR, transformers' UnlimitedOcr port, DeepSeek-OCR-2; local directory / file or hub
id). The tower class follows from the weights (or, for `random`, from the config or the mode's layout)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from ..configuration_deepencoder import DeepEncoderConfig
from ..configuration_deepencoder_v2 import DeepEncoderV2Config
from ..conversion.hub import HubOptions
from ..conversion.io import CheckpointError
from ..conversion.load import load_tower
from ..image_processing_deepencoder import RESOLUTION_MODES
from .names import DEFAULT_WEIGHTS, RANDOM

TOWER_CONFIGS: dict[str, type[PretrainedConfig]] = {
    DeepEncoderConfig.model_type: DeepEncoderConfig,
    DeepEncoderV2Config.model_type: DeepEncoderV2Config,
}


class WeightsError(RuntimeError):
    """The weights cannot be loaded; the message is one sentence saying what to pass instead."""


def is_save_pretrained_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") in TOWER_CONFIGS
    except (OSError, json.JSONDecodeError):
        return False


def load_config(config: str | os.PathLike | PretrainedConfig | None, mode: str | None = None) -> PretrainedConfig:
    """None -> the released architecture of the tower the mode is for (V2 for `ocr2` modes, else v1); a tower
    config; a config.json file or a directory holding one (its `model_type` names the tower)."""
    if config is None:
        queries = mode is not None and mode in RESOLUTION_MODES and RESOLUTION_MODES[mode].layout == "queries"
        return DeepEncoderV2Config() if queries else DeepEncoderConfig()
    if isinstance(config, PretrainedConfig):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type", DeepEncoderConfig.model_type)
        if model_type not in TOWER_CONFIGS:
            raise ValueError(f"model_type {model_type!r} is not a DeepEncoder tower ({sorted(TOWER_CONFIGS)})")
        return TOWER_CONFIGS[model_type].from_json_file(str(path))
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read config {config} ({error})") from error


def load_model(
    weights: str | os.PathLike = DEFAULT_WEIGHTS,
    config: str | os.PathLike | PretrainedConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    mode: str | None = None,
    hub: HubOptions | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, str]:
    """Returns (tower in eval mode on `device` in `dtype`, a short description of where its weights came from).

    hub: `from_pretrained`'s hub arguments for a hub id or a folder's `subfolder` (revision, cache_dir,
    local_files_only, token, subfolder, force_download); the ranges read are kept in the hub cache.

    device: where the tower is built (default: the CPU). `random` initialises `config` (default: the released
    architecture of the tower `mode` is for) from `seed` there, once (the model's `_init_weights`; torch's default
    layer initialisation, which it would overwrite, is skipped), identically in every process on that device type
    (fp32, then cast); a `save_pretrained` directory is read straight to it (safetensors); a converted checkpoint's
    tower is built there (uninitialised) and the checkpoint's tensors copied into it, then cast to `dtype` there.
    """
    weights = os.fspath(weights)
    hub = hub or HubOptions()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if weights == RANDOM:
        devices = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type), device:
            torch.manual_seed(seed)
            with init.no_init_weights():  # torch's default initialisation of each layer, overwritten below, skipped
                model = AutoModel.from_config(load_config(config, mode))
            model.init_weights()  # the model's own `_init_weights`, once
        description = f"RANDOM weights (seed {seed}): outputs are meaningless, for trying the pipeline only"
    elif is_save_pretrained_dir(os.path.join(weights, hub.subfolder)):
        loading = {"dtype": dtype} if dtype is not None else {}
        model = AutoModel.from_pretrained(os.path.join(weights, hub.subfolder), device_map=device, **loading)
        description = f"deepencoder checkpoint {weights}"
    else:
        try:
            model, _ = load_tower(weights, family=None, dtype=dtype, hub=hub, device=device)
        except CheckpointError as error:
            message = (
                f"{error}; pass --weights with a local DeepSeek-OCR directory, a `deepencoder convert` output, or "
                "`random`"
            )
            raise WeightsError(message) from error
        description = f"converted checkpoint {weights} (vision tensors only)"
    return model.to(device=device, dtype=dtype).eval(), description
