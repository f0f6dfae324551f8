"""Run configuration: nested dataclasses, read from YAML or JSON, overridable from the command line.

```yaml
train: {output_dir: runs/ocr, max_steps: 200, batch_size: 8, optim: {lr: 3.0e-4}}
tower: {preset: tiny, freeze: [sam.blocks.0-1], lora: {stages: [clip], r: 8}}
```
`load_config(OcrFinetuneConfig, "run.yaml", ["train.max_steps=50", "tower.lora.r=4"])`. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The tiny tower the tests and CPU examples use: windows (with padding), global blocks, rel-pos, interpolation.
TOWER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sam_config": {
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "global_attn_indexes": [1, 3],
            "window_size": 6,
            "image_size": 256,
            "out_channels": 32,
            "compressor_channels": [48, 64],
        },
        "clip_config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 56,
        },
        "projector_dim": 80,
    },
    "deepseek-ocr": {},
}


@dataclass
class OptimConfig:
    """AdamW + warmup then cosine / linear / constant schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    # learning-rate multipliers by parameter-name prefix of the trained module, the longest prefix wins:
    # e.g. {vision: 0.5, connector: 1.0} for OcrVisionLanguageModel (`vision.`, `connector.`, `language_model.`)
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The loop. `batch_size` is the global batch of one optimizer step, split evenly over processes.
    `resume`: `auto` (latest checkpoint in output_dir/checkpoints, if any), `never`, or a checkpoint path."""

    output_dir: str = "runs/train"
    max_steps: int = 100
    batch_size: int = 4
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    resume: str = "auto"
    shuffle: bool = True  # a new random order each epoch; False: index order (a synthetic curriculum needs it)
    progress: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class LoraSettings:
    """LoRA on `LORA_TARGETS[stage]` for each stage; off when `stages` is empty."""

    stages: list[str] = field(default_factory=list)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0


@dataclass
class TowerSettings:
    """Where the tower comes from and what of it trains.

    pretrained: a `save_pretrained` directory, `deepseek-ocr:<dir or hub id>`, or None for random weights of
    `preset` (`tiny` | `deepseek-ocr`) updated with `config` (DeepEncoderConfig keyword arguments).
    freeze / unfreeze: targets of `DeepEncoderModel.freeze`, applied in that order.
    """

    pretrained: str | None = None
    preset: str = "tiny"
    config: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str | None = None
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataSettings:
    """kind: `synthetic` (rendered pages), `folder` (image + .txt pairs under `root`), `manifest` (precomputed
    tokens: `manifest` + optional `texts` sidecar). `mode` / `base_size` / `tile_size` configure the image
    processor (pages); `image_size` is the square side for SAM pretraining.

    Synthetic text: `vocabulary` `words` (the built-in English word list) or `random` (strings of `alphabet`
    characters, lengths in `word_length`); a fraction `numbers` of the words are numbers (1 to `word_length[1]`
    digits). `margin`: (min, max) px of the random offset of the text block from the top-left corner.
    `curriculum`: pages over which the text grows, in index order, from one line of one word of `word_length[0]`
    characters to the full ranges (0: off; needs `train.shuffle: false`)."""

    kind: str = "synthetic"
    num_samples: int = 64
    size: tuple[int, int] = (256, 256)
    lines: tuple[int, int] = (1, 3)
    words_per_line: tuple[int, int] = (1, 4)
    font_size: tuple[int, int] = (18, 26)
    font: str | None = None
    vocabulary: str = "words"
    alphabet: str = "abcdefghijklmnopqrstuvwxyz"
    word_length: tuple[int, int] = (2, 6)
    numbers: float = 0.0
    margin: tuple[int, int] = (8, 8)
    curriculum: int = 0
    seed: int = 0
    root: str | None = None
    manifest: str | None = None
    texts: str | None = None
    mode: str = "tiny"
    base_size: int | None = 128
    tile_size: int | None = None
    image_size: int = 256


@dataclass
class LanguageModelSettings:
    """pretrained: an `AutoModelForCausalLM` id or directory (its tokenizer is used too); None builds a random
    `family` model of the given size with the byte tokenizer. `train`: update the LM (else frozen)."""

    pretrained: str | None = None
    family: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_text_tokens: int = 128
    train: bool = True
    initializer_range: float | None = None  # random LM only: std of its initial weights (transformers' 0.02)


@dataclass
class EvalSettings:
    """Held-out transcription (`deepencoder.training.evaluation`): off when `num_samples` is 0.

    data: overrides of the run's `DataSettings` that describe the held-out set, e.g. `{seed: 1, vocabulary: words}`
        for other synthetic pages or `{root: data/val}` for a folder; a synthetic held-out set with no `seed` given
        takes the training seed + 1, and its words are kept out of the training pages.
    every: also evaluate every this many steps during training (0: only at the end).
    num_samples: held-out pages used (the first ones of the set); max_new_tokens: greedy decoding limit
        (default: the LM's `max_text_tokens`); batch_size: pages per tower / decoding batch; seed: the shuffle of
        the page-blind control.
    """

    num_samples: int = 0
    every: int = 0
    batch_size: int = 16
    max_new_tokens: int | None = None
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class OcrFinetuneConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    tower: TowerSettings = field(default_factory=TowerSettings)
    language_model: LanguageModelSettings = field(default_factory=LanguageModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    sample_transcriptions: int = 2


@dataclass
class MimSettings:
    mask_ratio: float = 0.75
    mask_block: int = 1
    decoder_hidden: int = 256
    norm_pix_loss: bool = True


@dataclass
class SamPretrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    tower: TowerSettings = field(default_factory=TowerSettings)
    data: DataSettings = field(default_factory=DataSettings)
    mim: MimSettings = field(default_factory=MimSettings)
    num_reconstructions: int = 4


def _wants_float(hint) -> bool:
    if hint is float:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}".lstrip("."))
        elif typing.get_origin(hint) is tuple and value is not None:
            kwargs[name] = tuple(value)
        elif _wants_float(hint) and isinstance(value, (int, str)) and not isinstance(value, bool):
            kwargs[name] = float(value)  # YAML reads `3e-4` (no dot) as a string
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build dataclass `cls` from a YAML/JSON file (or defaults) plus `key.sub=value` overrides (values parsed
    as YAML: `3e-4`, `[a, b]`, `true`)."""
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        values = json.loads(text) if str(path).endswith(".json") else (yaml.safe_load(text) or {})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set_dotted(values, key.strip(), yaml.safe_load(raw))
    return _build(cls, values, "")


def config_to_dict(config) -> dict[str, Any]:
    """Plain dict (tuples as lists) for saving next to a run."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
