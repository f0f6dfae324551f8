"""Converters against the real libraries: random-weight checkpoints made by segment-anything, open_clip and
transformers in their own formats, converted, then run beside the source library (fp32, max abs error / max abs
reference <= 1e-4). Real size once per source; the rest on shrunk configs that keep real widths or structure."""

from __future__ import annotations

from functools import partial

import torch
from fsspec.implementations.local import LocalFileSystem
from helpers import randomize_

TINY_CLIP_WIDTH = 64


def segment_anything_sam(embed_dim=64, depth=4, heads=2, global_attn_indexes=(1, 3), img_size=256, window=6, seed=0):
    """A full segment-anything `Sam` (image encoder, prompt encoder, mask decoder) built as `build_sam` does,
    with the encoder's size chosen by the caller, weights randomised (its init zeroes rel-pos and pos-embed)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = img_size // 16
    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(global_attn_indexes),
        window_size=window,
        out_chans=256,
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64, num_heads=8),
            transformer_dim=256,
            iou_head_depth=1,
            iou_head_hidden_dim=32,
        ),
    )
    return randomize_(sam, seed=seed).eval()


def open_clip_model(width=TINY_CLIP_WIDTH, layers=2, vocab_size=1000, seed=0):
    """A full open_clip `CLIP` (visual + text tower) with quick-GELU, as OpenAI's weights are, randomised."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=layers, width=width, head_width=16, patch_size=14, image_size=56),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=vocab_size, width=32, heads=2, layers=1),
        quick_gelu=True,
    )
    return randomize_(model, seed=seed).eval()


def open_clip_trunk(visual, embeddings: torch.Tensor) -> torch.Tensor:
    """open_clip's visual transformer before `ln_post`, on token embeddings (B, 1 + N, C)."""
    x = visual.ln_pre(embeddings)
    if getattr(visual.transformer, "batch_first", True):
        return visual.transformer(x)
    return visual.transformer(x.transpose(0, 1)).transpose(0, 1)


def open_clip_embeddings(visual, tokens: torch.Tensor) -> torch.Tensor:
    """cls + patch tokens (B, N, C) + open_clip's positional embedding -> (B, 1 + N, C)."""
    cls = visual.class_embedding.expand(tokens.shape[0], 1, -1)
    return torch.cat([cls, tokens], dim=1) + visual.positional_embedding


def hf_clip_vision(width=TINY_CLIP_WIDTH, layers=2, heads=4, seed=0, full=False):
    """transformers `CLIPVisionModel` (or a full `CLIPModel` when full=True), randomised."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=56,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    if full:
        config = CLIPConfig(
            vision_config=vision,
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=500
            ),
            projection_dim=16,
        )
        model = CLIPModel(config)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    return randomize_(model, seed=seed).eval()


def hf_clip_trunk(vision_model, embeddings: torch.Tensor) -> torch.Tensor:
    """transformers' CLIP encoder after `pre_layrnorm`, on token embeddings (B, 1 + N, C)."""
    return vision_model.encoder(inputs_embeds=vision_model.pre_layrnorm(embeddings)).last_hidden_state


class CountingFileSystem(LocalFileSystem):
    """Local files served through the fsspec interface the hub path uses (`HfFileSystem`), recording every read
    (offset, length) so a test can check that only the selected tensors' bytes were fetched."""

    cachable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, int, int]] = []

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        reads, read = self.reads, handle.read

        def counted_read(size=-1):
            offset = handle.tell()
            data = read(size)
            reads.append((str(path), offset, len(data)))
            return data

        handle.read = counted_read
        return handle

    @property
    def bytes_read(self) -> int:
        return sum(length for _, _, length in self.reads)


def unlimited_ocr_model(seed=12, vocab_size=20000):
    """transformers' `UnlimitedOcrForConditionalGeneration` with the tiny tower of helpers.TINY_SAM / TINY_CLIP (CLIP
    with 4 heads of 16 and exact GELU, which tensor shapes cannot tell) and a one-layer language model whose large
    vocabulary makes most of the file, randomised."""
    from transformers.models.unlimited_ocr.configuration_unlimited_ocr import UnlimitedOcrConfig
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import UnlimitedOcrForConditionalGeneration

    config = UnlimitedOcrConfig(
        vision_config=dict(
            sam_config=dict(
                hidden_size=64,
                output_channels=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                image_size=256,
                window_size=6,
                global_attn_indexes=[1, 3],
                mlp_dim=256,
                downsample_channels=[48, 64],
            ),
            encoder_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=56,
                hidden_act="gelu",
            ),
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=80,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            n_routed_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            n_shared_experts=1,
        ),
    )
    return randomize_(UnlimitedOcrForConditionalGeneration(config), seed=seed).eval()


# ---------------------------------------------------------------------------------------------------- tests
import json  # noqa: E402

import pytest  # noqa: E402
from helpers import TINY_CLIP, TINY_SAM, random_model, rel_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deepencoder import DeepEncoderModel  # noqa: E402
from deepencoder.cli import main  # noqa: E402
from deepencoder.conversion.load import load_clip, load_segment_anything  # noqa: E402
from deepencoder.conversion.sources import (  # noqa: E402
    assemble_model,
    build_model,
    convert_state_dict,
    read_converted,
)

TOL = 1e-4
SMALL_CLIP = dict(TINY_CLIP, num_attention_heads=4)  # for a SAM-only conversion: keeps the untouched stage cheap


def save_safetensors(state_dict, path):
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(path), metadata={"format": "pt"})
    return path


def assert_sam_parity(model, reference_encoder, image_size, batch=1):
    pixels = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        expected = reference_encoder(pixels)
        actual = model.sam.neck_features(pixels)
    error = rel_err(actual, expected)
    assert error <= TOL, error
    return error


def assert_clip_parity(model, reference_trunk, visual_embeddings, width, grid):
    """Same token embeddings into both trunks; and our `clip(sam_features)` against the reference on the
    embeddings built from the same features."""
    tokens = torch.randn(2, grid * grid, width)
    with torch.no_grad():
        embeddings = visual_embeddings(tokens)
        expected = reference_trunk(embeddings)
        errors = [rel_err(model.clip.encode(embeddings)[0], expected)]
        features = tokens.transpose(1, 2).reshape(2, width, grid, grid)  # row-major, as the SAM stage emits
        errors.append(rel_err(model.clip(features), expected))
    assert max(errors) <= TOL, errors
    return max(errors)


@pytest.mark.slow
def test_segment_anything_vit_b_real_size(tmp_path):
    """`build_sam_vit_b()` saved as the released .pth is: config read from shapes, every image-encoder tensor
    copied bit for bit, prompt encoder / mask decoder dropped, the rest initialised and reported."""
    from segment_anything import build_sam_vit_b

    sam = randomize_(build_sam_vit_b(), seed=1).eval()
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), path)
    model, report = load_segment_anything(path, clip_config=SMALL_CLIP)
    config = model.config.sam_config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.global_attn_indexes, config.window_size, config.image_size) == ([2, 5, 8, 11], 14, 1024)
    ours = model.state_dict()
    for key, tensor in sam.image_encoder.state_dict().items():
        assert torch.equal(ours[f"sam.{key}"], tensor), key
    assert any(k.startswith("mask_decoder.") for k in report.dropped)
    assert any(k.startswith("prompt_encoder.") for k in report.dropped)
    assert {"sam.net_2.weight", "sam.net_3.weight", "projector.weight", "image_newline"} <= set(report.initialised)
    assert not any(k.startswith("sam.") and "net_" not in k for k in report.initialised)
    # the forward at this width and depth is compared in test_segment_anything_shrunk_configs[vit_b] (at 128 px:
    # a 1024-px ViT-B forward costs tens of seconds on a 2-core CI machine)


@pytest.mark.parametrize(
    "width, heads, depth, global_attn_indexes",
    [
        (768, 12, 12, (2, 5, 8, 11)),  # ViT-B: all blocks, real global blocks
        (1024, 16, 6, (5,)),  # ViT-L width and heads, its first 6 blocks (first global block at 5)
        (1280, 16, 2, (1,)),  # ViT-H width and heads, 2 blocks (one windowed, one global)
    ],
    ids=["vit_b", "vit_l_6_blocks", "vit_h_2_blocks"],
)
def test_segment_anything_shrunk_configs(tmp_path, width, heads, depth, global_attn_indexes):
    """Real widths and heads at a 128-px native size with 4-token windows (2 x 2 windows on the 8 x 8 grid):
    segment-anything's encoder runs only at its own img_size, and 1024 px is too slow for CI."""
    sam = segment_anything_sam(width, depth, heads, global_attn_indexes, img_size=128, window=4, seed=2)
    path = tmp_path / "sam.pth"
    torch.save(sam.state_dict(), path)
    model, _ = load_segment_anything(path, clip_config=SMALL_CLIP)
    config = model.config.sam_config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (width, heads, depth)
    assert config.global_attn_indexes == list(global_attn_indexes) and config.window_size == 4
    assert_sam_parity(model, sam.image_encoder, 128)


def test_transformers_sam_vision_model(tmp_path):
    from transformers import SamVisionConfig, SamVisionModel

    reference = SamVisionModel(
        SamVisionConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=256,
            output_channels=32,
            window_size=6,
            global_attn_indexes=[1, 3],
            mlp_dim=256,
        )
    )
    randomize_(reference, seed=3).eval()
    reference.save_pretrained(tmp_path / "hf-sam")
    model, report = load_segment_anything(tmp_path / "hf-sam", clip_config=SMALL_CLIP)
    assert model.config.sam_config.global_attn_indexes == [1, 3] and model.config.sam_config.window_size == 6
    assert_sam_parity(model, lambda x: reference(x).last_hidden_state, 256)


@pytest.mark.slow
def test_open_clip_vit_l_14_quickgelu_real_size():
    """open_clip's `ViT-L-14-quickgelu` (OpenAI's architecture) state dict, text tower included."""
    import open_clip

    reference = randomize_(open_clip.create_model("ViT-L-14-quickgelu"), seed=4).eval()
    part = convert_state_dict(reference.state_dict())
    assert part.format.name == "open-clip"
    assert {"visual.ln_post.weight", "visual.proj", "visual.conv1.weight", "token_embedding.weight"} <= set(
        part.report.dropped
    )
    model, report = assemble_model(
        None, part, source="ViT-L-14-quickgelu", sam_config=dict(TINY_SAM, compressor_channels=[512, 1024])
    )
    clip = model.config.clip_config
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads, clip.num_positions) == (
        1024,
        24,
        16,
        257,
    )
    # the trunk on the CLS row + 16 patch tokens (the trunk is the same for any length; 257 tokens through 24
    # CLIP-L layers three times is too slow for CI); clip(sam_features) is compared at full grid on small configs
    visual = reference.visual
    tokens = torch.randn(1, 16, 1024)
    with torch.no_grad():
        cls = visual.class_embedding.expand(1, 1, -1)
        embeddings = torch.cat([cls, tokens], dim=1) + visual.positional_embedding[:17]
        error = rel_err(model.clip.encode(embeddings)[0], open_clip_trunk(visual, embeddings))
    assert error <= TOL, error


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_open_clip_file(tmp_path, suffix):
    reference = open_clip_model(seed=5)
    path = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".safetensors":
        save_safetensors(reference.state_dict(), path)
    else:
        torch.save(reference.state_dict(), path)
    model, report = load_clip(path, clip_config={"num_attention_heads": 4})
    assert report.dropped["visual.ln_post.weight"].startswith("post-LayerNorm")
    assert "text_projection" in report.dropped and "visual.proj" in report.dropped
    assert any(k.startswith("sam.blocks.") for k in report.initialised)
    visual = reference.visual
    assert_clip_parity(model, lambda e: open_clip_trunk(visual, e), lambda t: open_clip_embeddings(visual, t), 64, 4)


@pytest.mark.parametrize("full", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_transformers_clip(tmp_path, full):
    """Heads (4, not width / 64) and the activation come from the directory's config.json."""
    reference = hf_clip_vision(seed=6, full=full)
    reference.save_pretrained(tmp_path / "hf-clip")
    model, report = load_clip(tmp_path / "hf-clip")
    assert model.config.clip_config.num_attention_heads == 4
    assert any(key.endswith("post_layernorm.weight") for key in report.dropped)
    if full:
        assert "visual_projection.weight" in report.dropped and "logit_scale" in report.dropped
        assert any(k.startswith("text_model.") for k in report.dropped)
    vision = getattr(reference, "vision_model", reference)  # transformers 5: CLIPVisionModel is the tower itself
    embeddings = vision.embeddings

    def build(tokens):
        cls = embeddings.class_embedding.expand(tokens.shape[0], 1, -1)
        return torch.cat([cls, tokens], dim=1) + embeddings.position_embedding.weight

    assert_clip_parity(model, lambda e: hf_clip_trunk(vision, e), build, 64, 4)


def test_cli_compose_sharded_auto_model(tmp_path):
    """`deepencoder convert compose --sam SAM.pth --clip CLIP.safetensors OUT`: both stages equal to their
    sources after a sharded save and `AutoModel.from_pretrained`; what no source has is initialised and reported."""
    from transformers import AutoModel

    sam = segment_anything_sam(seed=7)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    clip = open_clip_model(seed=8)
    save_safetensors(clip.state_dict(), tmp_path / "clip.safetensors")
    out = tmp_path / "composed"
    code = main(
        [
            "convert",
            "compose",
            "--sam",
            str(tmp_path / "sam.pth"),
            "--clip",
            str(tmp_path / "clip.safetensors"),
            str(out),
            "--clip-num-attention-heads",
            "4",
            "--max-shard-size",
            "200KB",
        ]
    )
    assert code == 0
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "preprocessor_config.json").exists()
    report = json.loads((out / "conversion_report.json").read_text())
    assert {
        "sam.net_2.weight",
        "sam.net_3.weight",
        "projector.weight",
        "projector.bias",
        "image_newline",
        "view_separator",
    } == set(report["initialised"])
    card = (out / "README.md").read_text()
    assert "Apache-2.0" in card and "initialised" in card and "prompt encoder" in card
    model = AutoModel.from_pretrained(out).eval()
    assert type(model) is DeepEncoderModel
    assert model.config.sam_config.compressor_channels == [32, 64]
    assert_sam_parity(model, sam.image_encoder, 256)
    visual = clip.visual
    assert_clip_parity(model, lambda e: open_clip_trunk(visual, e), lambda t: open_clip_embeddings(visual, t), 64, 4)
    with torch.no_grad():
        assert model.encode_views(torch.randn(1, 3, 256, 256)).image_embeds.shape == (1, 16, 1280)


def test_cli_segment_anything_bf16(tmp_path):
    sam = segment_anything_sam(seed=9)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    out = tmp_path / "bf16"
    assert main(["convert", "segment-anything", str(tmp_path / "sam.pth"), str(out), "--dtype", "bf16"]) == 0
    saved = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert torch.equal(saved["sam.blocks.1.attn.rel_pos_h"], sam.image_encoder.blocks[1].attn.rel_pos_h.bfloat16())
    model = DeepEncoderModel.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_compose_from_own_directory_and_transformers_clip(tmp_path):
    """This library's own directories are sources too: the SAM stage (compressor included) of a saved tower with
    the CLIP stage of a transformers checkpoint."""
    own = random_model(seed=10)
    own.save_pretrained(tmp_path / "own")
    hf = hf_clip_vision(seed=11)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["convert", "compose", "--sam", str(tmp_path / "own"), "--clip", str(tmp_path / "hf"), str(out)]) == 0
    model = DeepEncoderModel.from_pretrained(out)
    ours = own.state_dict()
    for key, tensor in model.state_dict().items():
        if key.startswith("sam."):
            assert torch.equal(tensor, ours[key]), key
    report = json.loads((out / "conversion_report.json").read_text())
    assert set(report["initialised"]) == {"projector.weight", "projector.bias", "image_newline", "view_separator"}


@pytest.mark.parametrize("original_names", [True, False], ids=["default-save", "transformers-names"])
def test_transformers_unlimited_ocr_checkpoint(tmp_path, original_names):
    """A transformers `UnlimitedOcrForConditionalGeneration.save_pretrained` directory (by default in DeepSeek-OCR's
    names; with `save_original_format=False` in transformers' own) converts reading only the vision tensors, its
    config.json supplying what shapes cannot (CLIP heads, activation); the converted tower equals transformers'
    vision path + projector, and its page layout (newline per row, view separator) equals transformers'."""
    reference = unlimited_ocr_model()
    source = tmp_path / "unlimited-ocr"
    reference.save_pretrained(source, save_original_format=original_names)
    filesystem = CountingFileSystem()
    part = read_converted(str(source), filesystem=filesystem)
    assert part.format.name == ("deepseek-ocr" if original_names else "hf-unlimited-ocr")
    size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    assert 0 < filesystem.bytes_read < 0.2 * size, (filesystem.bytes_read, size)  # the language model is not read

    out = tmp_path / "converted"
    assert main(["convert", "unlimited-ocr", str(source), str(out), "--dtype", "float32"]) == 0
    model = DeepEncoderModel.from_pretrained(out).eval()
    clip = model.config.clip_config
    assert (clip.num_attention_heads, clip.hidden_act, model.config.projector_dim) == (4, "gelu", 80)
    direct = DeepEncoderModel.from_deepseek_ocr(str(source))  # what `deepencoder encode --weights` loads
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in model.state_dict().items())
    # `from_pretrained` converts it on load (transformers' own loading would find none of the tower's keys)
    pretrained = DeepEncoderModel.from_pretrained(str(source), dtype="bf16")
    assert next(pretrained.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(pretrained.state_dict()[k], v.bfloat16()) for k, v in model.state_dict().items())
    in_memory, _ = build_model(convert_state_dict(reference.state_dict(), config_json=reference.config.to_dict()))
    assert in_memory.config.to_dict() == direct.config.to_dict()
    assert all(torch.equal(in_memory.state_dict()[k], v) for k, v in model.state_dict().items())

    views, tiles, grids = torch.randn(2, 3, 256, 256), torch.randn(3, 3, 128, 128), [(3, 1), (1, 1)]
    with torch.no_grad():
        expected = reference.model.multi_modal_projector(reference.model.vision_tower(views).last_hidden_state)
        assert rel_err(model.encode_views(views).image_embeds, expected) <= 1e-5
        ours = model(pixel_values=views, pixel_values_tiles=tiles, tile_grids=grids).image_embeds
        theirs = reference.model.get_image_features(
            views, pixel_values_local=tiles, num_local_patches=[3, 0], patches_grid=grids
        ).pooler_output
    for page, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.shape == b.shape, page
        assert rel_err(a, b) <= 1e-5, page


def test_unlimited_ocr_names_and_configs_round_trip():
    """Ours -> transformers' names -> ours is exact; transformers' `UnlimitedOcrModel` built from our config takes
    the mapped tensors with no key left over on either side (its language model aside); configs map both ways."""
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import UnlimitedOcrModel

    from deepencoder.conversion.unlimited_ocr import (
        deepencoder_config_from_unlimited_ocr,
        from_unlimited_ocr,
        to_unlimited_ocr,
        unlimited_ocr_config,
    )

    model = random_model(seed=13)
    state = model.state_dict()
    theirs = to_unlimited_ocr(state)
    back = from_unlimited_ocr(theirs)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], value) for key, value in state.items())

    text = dict(
        vocab_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=8,
        n_shared_experts=1,
    )
    config = unlimited_ocr_config(model.config, text)
    transformers_model = UnlimitedOcrModel(config)
    missing, unexpected = transformers_model.load_state_dict(theirs, strict=False)
    assert not unexpected and all(key.startswith("language_model.") for key in missing), (missing, unexpected)
    ours_again = deepencoder_config_from_unlimited_ocr(config).to_dict()
    expected = model.config.to_dict()
    for stage in ("sam_config", "clip_config"):
        for key, value in ours_again[stage].items():
            if key in TINY_SAM or key in TINY_CLIP or key in ("hidden_act", "layer_norm_eps", "mlp_ratio"):
                assert value == expected[stage][key], (stage, key)
    assert ours_again["projector_dim"] == model.config.projector_dim
