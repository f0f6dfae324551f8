"""`model.compile()`: the compiled `encode_views` behind `forward` equals the eager tower (fp32, relative error
<= 1e-5), `uncompile()` restores it, and a cache folder receives the portable compile artifacts that a later run
loads; views per call, fixed in a compiled tower and a bound in an eager one, never change a page's tokens. Timing
across processes (the second run's start-up) is measured by `benchmarks/compile_cache.py`, not here."""

import os

import pytest
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


class _ShapeRecorder:
    """A torch.compile backend that runs the traced graph as is and notes the view shapes of every graph built."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, graph, example_inputs):
        self.shapes += [
            tuple(x.shape)  # RGB views; the graph's other inputs are parameters (a patch kernel is (C, 3, 16, 16))
            for x in example_inputs
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 3 and x.shape[-1] >= 64
        ]
        return graph.forward


def _gundam_like_batches(generator):
    """Two batches of pages with differing tile counts (3 pages: 2x1, 1x1, 3x1 tiles; then 2 pages: 1x2, 2x2),
    global views 256 px and tiles 128 px."""
    batches = []
    for grids in ([(2, 1), (1, 1), (3, 1)], [(1, 2), (2, 2)]):
        tiled = [g for g in grids if g != (1, 1)]
        tiles = sum(c * r for c, r in tiled)
        batches.append((torch.randn(len(grids), 3, 256, 256, generator=generator),
                        torch.randn(tiles, 3, 128, 128, generator=generator), grids))  # fmt: skip
    return batches


def test_fixed_views_per_call_compiles_one_graph_per_view_size_and_never_outputs_padding():
    """`compile(views_per_call=4)`: batches of 3 and 2 pages with 5 and 6 tiles reach the compiled graph only as
    4 views of 256 px and 4 tiles of 128 px; every page's tokens equal the eager tower's on that page alone (1e-5),
    token counts are the layout's (no padded view's tokens), and `set_views_per_call` moves to a new size."""
    model = random_model()
    batches = _gundam_like_batches(torch.Generator().manual_seed(5))
    expected = []
    with torch.inference_mode():
        for views, tiles, grids in batches:
            start = 0
            for i, grid in enumerate(grids):  # each page alone: nothing shares its call
                count = grid[0] * grid[1] if grid != (1, 1) else 0
                alone = model(views[i : i + 1], tiles[start : start + count] if count else None, [grid])
                expected.append(alone.image_embeds[0])
                start += count
    torch._dynamo.reset()
    recorder = _ShapeRecorder()
    model.compile(backend=recorder, views_per_call=4)
    assert model.views_per_call == 4
    actual = []
    with torch.inference_mode():
        for views, tiles, grids in batches:
            actual += model(views, tiles, grids).image_embeds
    assert sorted(set(recorder.shapes)) == [(4, 3, 128, 128), (4, 3, 256, 256)]
    assert [a.shape for a in actual] == [e.shape for e in expected]
    assert max(rel_err(a, e) for a, e in zip(actual, expected)) < TOL
    model.set_views_per_call(2)
    with torch.inference_mode():
        again = model(*batches[1][:2], batches[1][2]).image_embeds
    assert (2, 3, 256, 256) in recorder.shapes and (2, 3, 128, 128) in recorder.shapes
    assert max(rel_err(a, e) for a, e in zip(again, expected[3:])) < TOL
    model.uncompile()
    assert model.views_per_call is None


def test_fixed_views_per_call_v2_hidden_states_cut_to_the_real_views():
    """V2: a call of 3 tiles of 768 px with `views_per_call=2` runs as two calls of 2; outputs and every hidden
    state hold exactly the 3 real views and equal the eager tower's (1e-5)."""
    from fixtures.v2_support import tiny_config_kwargs
    from helpers import randomize_

    from deepencoder import DeepEncoderV2Config, DeepEncoderV2Model

    model = randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs())), 0).eval()
    views = torch.randn(3, 3, 768, 768, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected = model.encode_views(views, output_hidden_states=True)
    torch._dynamo.reset()
    recorder = _ShapeRecorder()
    model.compile(backend=recorder, views_per_call=2)
    with torch.inference_mode():
        actual = model.encode_views(views, output_hidden_states=True)
    model.uncompile()
    assert set(recorder.shapes) == {(2, 3, 768, 768)}
    assert actual.image_embeds.shape == expected.image_embeds.shape
    assert rel_err(actual.image_embeds, expected.image_embeds) < TOL
    for got, want in zip(actual.sam_hidden_states + actual.encoder_hidden_states,
                         expected.sam_hidden_states + expected.encoder_hidden_states, strict=True):  # fmt: skip
        assert got.shape == want.shape and rel_err(got, want) < TOL


def _record_view_shapes(model) -> list[tuple[int, ...]]:
    """The (B, 3, H, W) of every pass through the SAM patch embedding, from a forward pre-hook."""
    shapes: list[tuple[int, ...]] = []
    model.sam.patch_embed.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_eager_views_per_call_bounds_each_pass_and_keeps_every_page():
    """Eager `set_views_per_call(2)`: batches of 3 and 2 pages with 5 and 6 tiles reach the tower in passes of at
    most 2 views, the last pass of a call shorter (no padding in an eager pass); every page's tokens equal the
    one-pass tower's (1e-5) with the layout's token counts; None lifts the limit."""
    model = random_model()
    batches = _gundam_like_batches(torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = [page for views, tiles, grids in batches for page in model(views, tiles, grids).image_embeds]
    shapes = _record_view_shapes(model)
    model.set_views_per_call(2)
    assert model.views_per_call == 2
    with torch.inference_mode():
        actual = [page for views, tiles, grids in batches for page in model(views, tiles, grids).image_embeds]
    # batch 1: 3 global views (2 + 1), 5 tiles (2 + 2 + 1); batch 2: 2 global views, 6 tiles (2 + 2 + 2)
    assert [s[0] for s in shapes] == [2, 1, 2, 2, 1, 2, 2, 2, 2]
    assert [a.shape for a in actual] == [e.shape for e in expected]
    assert max(rel_err(a, e) for a, e in zip(actual, expected)) < TOL
    model.set_views_per_call(None)
    shapes.clear()
    with torch.inference_mode():
        model(*batches[1])
    assert model.views_per_call is None and [s[0] for s in shapes] == [2, 6]


def test_eager_views_per_call_v2_hidden_states_hold_every_view():
    """V2 eager, 3 tiles of 768 px at `views_per_call=2`: two passes (2 + 1); outputs and every hidden state hold
    the 3 views and equal one pass (1e-5)."""
    from fixtures.v2_support import tiny_config_kwargs
    from helpers import randomize_

    from deepencoder import DeepEncoderV2Config, DeepEncoderV2Model

    model = randomize_(DeepEncoderV2Model(DeepEncoderV2Config(**tiny_config_kwargs())), 0).eval()
    views = torch.randn(3, 3, 768, 768, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        expected = model.encode_views(views, output_hidden_states=True)
    shapes = _record_view_shapes(model)
    model.set_views_per_call(2)
    with torch.inference_mode():
        actual = model.encode_views(views, output_hidden_states=True)
    assert [s[0] for s in shapes] == [2, 1]
    assert actual.image_embeds.shape == expected.image_embeds.shape
    assert rel_err(actual.image_embeds, expected.image_embeds) < TOL
    for got, want in zip(actual.sam_hidden_states + actual.encoder_hidden_states,
                         expected.sam_hidden_states + expected.encoder_hidden_states, strict=True):  # fmt: skip
        assert got.shape == want.shape and rel_err(got, want) < TOL


def test_views_per_call_must_be_positive_and_compile_resets_it():
    model = random_model()
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            model.set_views_per_call(bad)
    model.set_views_per_call(3)
    model.compile(backend="eager")
    assert model.views_per_call is None  # compile() starts from the plain method: its own views_per_call decides
    model.set_views_per_call(4)  # a compiled tower's fixed size
    assert model.views_per_call == 4 and model.__dict__["encode_views"].compiled
    model.uncompile()
    assert model.views_per_call is None and "encode_views" not in model.__dict__


def test_cli_encode_views_per_call_flag(tmp_path, monkeypatch):
    """`deepencoder encode --views-per-call 2` (eager): a Gundam page with 6 tiles reaches the tower in passes of at
    most 2 views and its stored tokens equal the run without the flag (1e-5); a non-positive value is refused."""
    from pipeline_support import CLI_SIZE, text_page, tiny_weights
    from safetensors.torch import load_file

    from deepencoder.cli import main
    from deepencoder.modeling_deepencoder import DeepEncoderModel
    from deepencoder.pipeline.writer import read_rows

    passes: list[int] = []
    original = DeepEncoderModel.encode_views

    def recording(self, pixel_values, *args, **kwargs):
        passes.append(pixel_values.shape[0])
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(DeepEncoderModel, "encode_views", recording)
    weights = tiny_weights(tmp_path / "tiny")
    text_page((390, 260), "in passes").save(tmp_path / "page.png")  # 3x2 tiles of 128 px
    tokens, counts = {}, {}
    for flags in ([], ["--views-per-call", "2"]):
        out = tmp_path / f"out{len(flags)}"
        passes.clear()
        args = ["encode", str(tmp_path / "page.png"), "--weights", str(weights), "--out", str(out), *CLI_SIZE]
        assert main([*args, *flags]) == 0
        (row,) = read_rows(out / "manifest.jsonl")
        tokens[bool(flags)] = load_file(str(out / row["output"]))[row["key"]]
        counts[bool(flags)] = list(passes)
    assert counts[False] == [1, 6] and counts[True] == [1, 2, 2, 2]
    assert tokens[True].shape == tokens[False].shape and rel_err(tokens[True], tokens[False]) < TOL
    args = ["encode", str(tmp_path / "page.png"), "--weights", str(weights), "--out", str(tmp_path / "bad")]
    assert main([*args, *CLI_SIZE, "--views-per-call", "0"]) == 2
