"""`model.compile()`: the compiled `encode_views` behind `forward` equals the eager tower (fp32, relative error
<= 1e-5), `uncompile()` restores it, and a cache folder receives the portable compile artifacts that a later run
loads. Timing across processes (the second run's start-up) is measured by `benchmarks/compile_cache.py`, not here."""

import os

import torch
from helpers import random_model, rel_err
from torch import nn

from deepencoder.modeling_utils import CompileMixin

TOL = 1e-5


def test_compiled_tower_equals_eager_and_uncompiles(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "i")))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "t"))
    model = random_model()
    pages = torch.randn(2, 3, 256, 256)  # one shape: one compile
    with torch.inference_mode():
        expected = model(pages)
    torch._dynamo.reset()
    model.compile(backend="aot_eager", cache_dir=tmp_path / "cache", fullgraph=True)
    assert "encode_views" in vars(model)
    with torch.inference_mode():
        actual = model(pages)  # forward's layout in Python around the compiled `encode_views`
    assert rel_err(actual.global_embeds, expected.global_embeds) < TOL
    model.uncompile()
    assert "encode_views" not in vars(model)
    assert "encode_views" not in model.state_dict() and not any("compile" in k for k in model.state_dict())


def test_compiled_v2_tower_equals_eager():
    """DeepEncoder V2's `encode_views` compiled the same way (one 768 px tile shape: 144 queries)."""
    from fixtures.v2_support import tiny_config_kwargs
    from helpers import randomize_

    from deepencoder import DeepEncoderV2Config, DeepEncoderV2Model

    model = randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs())), 0).eval()
    views = torch.randn(2, 3, 768, 768, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model.encode_views(views).image_embeds
    torch._dynamo.reset()
    model.compile(backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        actual = model.encode_views(views).image_embeds
    model.uncompile()
    assert rel_err(actual, expected) < TOL


class _Views(CompileMixin, nn.Module):
    """The smallest module with a tower's `encode_views`, so inductor compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def encode_views(self, pixel_values):
        return torch.nn.functional.gelu(self.linear(pixel_values)) * 2


def test_compile_cache_folder_gets_artifacts_that_load(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "i")))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "t"))
    module = _Views()
    x = torch.randn(4, 8)
    expected = module.encode_views(x)
    torch._dynamo.reset()
    cache = tmp_path / "cache"
    module.compile(cache_dir=cache)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
    assert rel_err(module.encode_views(x), expected) < TOL
    artifacts = list(cache.glob("torch-*-cpu.bin"))
    assert len(artifacts) == 1 and artifacts[0].stat().st_size > 0
    assert any((cache / "inductor").rglob("*")), "inductor compiled into the cache folder"
    torch._dynamo.reset()
    assert torch.compiler.load_cache_artifacts(artifacts[0].read_bytes()) is not None
    again = _Views()
    again.load_state_dict(module.state_dict())
    again.compile(cache_dir=cache)  # loads the artifacts file, then compiles against the warm cache
    assert rel_err(again.encode_views(x), expected) < TOL


def test_cli_encode_compile_flag(tmp_path, monkeypatch):
    """`deepencoder encode --compile` compiles the tower once and writes the same tokens as the eager run (the
    compile itself on aot_eager here, so the test does not wait for inductor)."""
    from pipeline_support import CLI_SIZE, text_page, tiny_weights
    from safetensors.torch import load_file

    from deepencoder.cli import main
    from deepencoder.pipeline.writer import read_rows

    monkeypatch.setenv("DEEPENCODER_COMPILE_CACHE", "")
    compiled = []
    original = CompileMixin.compile

    def compile_on_aot_eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        original(self, *args, backend="aot_eager", **kwargs)

    monkeypatch.setattr(CompileMixin, "compile", compile_on_aot_eager)
    weights = tiny_weights(tmp_path / "tiny")
    text_page((300, 200), "compiled").save(tmp_path / "page.png")
    tokens = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"out{len(flags)}"
        torch._dynamo.reset()
        args = ["encode", str(tmp_path / "page.png"), "--weights", str(weights), "--out", str(out), *CLI_SIZE]
        assert main([*args, *flags]) == 0
        (row,) = read_rows(out / "manifest.jsonl")
        tokens[bool(flags)] = load_file(str(out / row["output"]))[row["key"]]
    assert compiled == ["DeepEncoderModel"]
    assert rel_err(tokens[True], tokens[False]) < TOL
