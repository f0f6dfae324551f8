"""Checkpoints that load like any hub model: `save_pretrained` of either tower and of the processor writes `auto_map`
and the model layer's own files, so `AutoModel` / `AutoImageProcessor.from_pretrained(..., trust_remote_code=True)`
work in an interpreter where `deepencoder` cannot be imported (not on `sys.path`, no installed distribution, no
editable finder), with features equal bit for bit to the installed package's (fp32, tiny towers). With the package
imported, the registered classes load the same folder without `trust_remote_code`, and so does a folder in the
format of earlier versions (no `auto_map`, no model files)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.v2_support import tiny_config_kwargs
from helpers import random_model, randomize_
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel

import deepencoder
from deepencoder import DeepEncoderImageProcessor, DeepEncoderModel, DeepEncoderV2Config, DeepEncoderV2Model

PACKAGE = Path(deepencoder.__file__).resolve().parent
MODEL_LAYER = ("configuration_", "modeling_", "image_processing_", "layout", "attention", "freezing", "dtypes")
CHECKPOINT_FILES = {"config.json", "model.safetensors", "preprocessor_config.json"}
# small views so the tiny towers run fast; tiles exercise the page layout (newlines / separators, tile queries)
PROCESSORS = {
    "v1": dict(mode="gundam", base_size=256, tile_size=128),
    "v2": dict(mode="ocr2", base_size=256, tile_size=128),
}


def tiny_v2() -> DeepEncoderV2Model:
    kwargs = tiny_config_kwargs()
    kwargs["encoder_config"]["query_counts"] = (4, 16)  # 128 px tiles, 256 px views
    return randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**kwargs)), seed=3).eval()


def page(seed: int = 0) -> Image.Image:
    """A wide RGB page (tiled by both processors), seeded noise over a gradient."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (200, 520, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(noise.numpy())


def installed_features(model, processor, image) -> dict[str, torch.Tensor]:
    """Processor outputs and per-page tokens from the installed package, one thread (as in the child)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = processor(image, return_tensors="pt")
        with torch.no_grad():
            out = model(
                pixel_values=inputs["pixel_values"],
                pixel_values_tiles=inputs.get("pixel_values_tiles"),
                tile_grids=inputs["tile_grids"],
            )
    finally:
        torch.set_num_threads(threads)
    features = {"pixel_values": inputs["pixel_values"]}
    if inputs.get("pixel_values_tiles") is not None:
        features["pixel_values_tiles"] = inputs["pixel_values_tiles"]
    features.update({f"image_embeds.{i}": t for i, t in enumerate(out.image_embeds)})
    return features


def hidden_site_packages(tmp_path: Path) -> Path:
    """A site directory holding every entry of this environment's site-packages except this package's own
    (its code, its dist-info, the editable install's .pth and finder): symlinks, so nothing is copied."""
    hidden = tmp_path / "site-packages"
    hidden.mkdir()
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            if "deepencoder" not in entry.name.lower() and not (hidden / entry.name).exists():
                (hidden / entry.name).symlink_to(entry)
    return hidden


CHILD = """
import importlib.metadata, importlib.util, json, sys
from pathlib import Path

assert importlib.util.find_spec("deepencoder") is None, "deepencoder is importable"
try:
    importlib.metadata.distribution("deepencoder")
    raise SystemExit("the deepencoder distribution is visible")
except importlib.metadata.PackageNotFoundError:
    pass

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel

torch.set_num_threads(1)
root = Path(sys.argv[1])
image = Image.open(root / "page.png")
classes = {}
for name in ("v1", "v2"):
    processor = AutoImageProcessor.from_pretrained(root / name, trust_remote_code=True)
    model = AutoModel.from_pretrained(root / name, trust_remote_code=True).eval()
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        out = model(
            pixel_values=inputs["pixel_values"],
            pixel_values_tiles=inputs.get("pixel_values_tiles"),
            tile_grids=inputs["tile_grids"],
        )
    features = {"pixel_values": inputs["pixel_values"]}
    if inputs.get("pixel_values_tiles") is not None:
        features["pixel_values_tiles"] = inputs["pixel_values_tiles"]
    features.update({f"image_embeds.{i}": t.contiguous() for i, t in enumerate(out.image_embeds)})
    save_file(features, str(root / f"{name}.features.safetensors"))
    classes[name] = [type(model).__module__, type(processor).__module__, type(model.config).__module__]
classes["deepencoder imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "deepencoder")
print(json.dumps(classes))
"""


def test_trust_remote_code_without_the_package(tmp_path):
    """Both towers and their processor, saved by the installed package, load in a fresh interpreter that cannot see
    `deepencoder` through transformers' remote-code path; processor outputs and tokens are bit-equal to the
    installed package's; the saved folders hold only the checkpoint and model-layer files of this package."""
    image = page()
    image.save(tmp_path / "page.png")
    expected = {}
    for name, model in (("v1", random_model(seed=5)), ("v2", tiny_v2())):
        processor = DeepEncoderImageProcessor(**PROCESSORS[name])
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        expected[name] = installed_features(model, processor, image)
        assert len(expected[name]) > 2 and "pixel_values_tiles" in expected[name]
        files = {entry.name for entry in (tmp_path / name).iterdir()}
        code = {file for file in files if file.endswith(".py")}
        assert files - code == CHECKPOINT_FILES, files
        assert all(file.startswith(MODEL_LAYER) and (PACKAGE / file).is_file() for file in code), code
        for file in code:  # the package's own files, not generated copies
            assert (tmp_path / name / file).read_bytes() == (PACKAGE / file).read_bytes(), file
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}, config["auto_map"]
        processor_config = json.loads((tmp_path / name / "preprocessor_config.json").read_text())
        assert processor_config["auto_map"] == {
            "AutoImageProcessor": "image_processing_deepencoder.DeepEncoderImageProcessor"
        }

    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))
    }
    environment.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    bootstrap = (
        f"import site, sys; site.addsitedir({str(hidden_site_packages(tmp_path))!r}); "
        f"sys.argv[1:] = [{str(tmp_path)!r}]; exec(compile({CHILD!r}, 'child', 'exec'))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", bootstrap],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    classes = json.loads(result.stdout.strip().splitlines()[-1])
    assert classes.pop("deepencoder imported") == []
    for name, modules in classes.items():  # transformers' dynamic modules, not this package
        assert all(module.startswith("transformers_modules.") for module in modules), modules
        actual = load_file(str(tmp_path / f"{name}.features.safetensors"))
        assert actual.keys() == expected[name].keys(), name
        for key, tensor in expected[name].items():
            assert actual[key].dtype == torch.float32 and torch.equal(actual[key], tensor), (name, key)


@pytest.mark.parametrize("tower", ["v1", "v2"])
def test_registered_classes_win_without_trust_remote_code(tmp_path, tower):
    """With the package imported, `AutoModel` / `AutoImageProcessor` / `AutoConfig.from_pretrained(folder)` with no
    `trust_remote_code` load this package's classes from a folder written with `auto_map` and model files."""
    model = random_model(seed=1) if tower == "v1" else tiny_v2()
    model.save_pretrained(tmp_path)
    DeepEncoderImageProcessor(**PROCESSORS[tower]).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is DeepEncoderImageProcessor
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tower", ["v1", "v2"])
def test_checkpoint_of_earlier_versions_still_loads(tmp_path, tower):
    """The format saved before `auto_map` (commit fbd3855): config.json without `auto_map`, no model files, and a
    processor config without it; `AutoModel` and the tower class load it, weights and processor settings equal."""
    model = random_model(seed=2) if tower == "v1" else tiny_v2()
    model.save_pretrained(tmp_path)
    DeepEncoderImageProcessor(**PROCESSORS[tower]).save_pretrained(tmp_path)
    for file in tmp_path.glob("*.py"):
        file.unlink()
    for name in ("config.json", "preprocessor_config.json"):
        values = json.loads((tmp_path / name).read_text())
        del values["auto_map"]
        (tmp_path / name).write_text(json.dumps(values))
    for loaded in (AutoModel.from_pretrained(tmp_path), type(model).from_pretrained(tmp_path)):
        assert type(loaded) is type(model)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is DeepEncoderImageProcessor
    assert (processor.mode, processor.base_size, processor.tile_size) == tuple(
        PROCESSORS[tower][k] for k in ("mode", "base_size", "tile_size")
    )


def test_model_layer_alone_does_not_convert(tmp_path):
    """Without the conversion layer's loaders (the situation of the copied files), a converting load says what to
    install instead of failing obscurely; with them (the package imported) it is registered."""
    from deepencoder import modeling_utils

    saved = dict(modeling_utils.CHECKPOINT_LOADERS)
    modeling_utils.CHECKPOINT_LOADERS.clear()
    try:
        with pytest.raises(ImportError, match="needs the `deepencoder` package"):
            DeepEncoderModel.from_deepseek_ocr(str(tmp_path))
        model = random_model(seed=4)
        model.save_pretrained(tmp_path / "own")
        loaded = DeepEncoderModel.from_pretrained(tmp_path / "own")  # transformers' own loading
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    finally:
        modeling_utils.CHECKPOINT_LOADERS.update(saved)
    assert set(saved) == {"pretrained", "deepseek-ocr", "deepseek-ocr2", "transformers"}


def test_push_to_hub_uploads_the_model_files(monkeypatch):
    """`push_to_hub` (transformers' own: `save_pretrained` into a temporary folder, then one upload of it) uploads
    the same self-contained folder: weights, configs with `auto_map`, and the model layer's files. The hub is not
    reached: the repository creation, the model card and the upload are recorded."""
    import transformers.utils.hub as transformers_hub

    uploaded: dict[str, dict[str, bytes]] = {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    class Card:
        def save(self, path):
            Path(path).write_text("card")

    def upload(self, folder, repo_id, **kwargs):
        files = uploaded.setdefault(repo_id, {})
        files.update({entry.name: entry.read_bytes() for entry in Path(folder).iterdir()})

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: Api())
    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card", lambda *args, **kwargs: Card())
    monkeypatch.setattr(transformers_hub.PushToHubMixin, "_upload_modified_files", upload)
    for name, model in (("org/v1", random_model(seed=6)), ("org/v2", tiny_v2())):
        model.push_to_hub(name)
        DeepEncoderImageProcessor(**PROCESSORS[name[-2:]]).push_to_hub(name)
        files = uploaded[name]
        code = {file for file in files if file.endswith(".py")}
        assert set(files) - code == CHECKPOINT_FILES | {"README.md"}, sorted(files)
        assert {"configuration_deepencoder.py", "image_processing_deepencoder.py", "modeling_utils.py"} <= code
        assert all(files[file] == (PACKAGE / file).read_bytes() for file in code)
        assert set(json.loads(files["config.json"])["auto_map"]) == {"AutoConfig", "AutoModel"}
        assert "AutoImageProcessor" in json.loads(files["preprocessor_config.json"])["auto_map"]
