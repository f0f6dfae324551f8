"""Page layout (tiles stitched, newline per row, global view, separator) against transformers'
`UnlimitedOcrModel.get_image_features`, which lays out the same tower's tokens independently."""

import torch
from helpers import random_model, rel_err, to_unlimited_ocr

from deepencoder.layout import count_tokens, layout_page


def unlimited_ocr_full_reference(model):
    from helpers import unlimited_ocr_reference
    from transformers.models.unlimited_ocr.configuration_unlimited_ocr import UnlimitedOcrConfig
    from transformers.models.unlimited_ocr.modeling_unlimited_ocr import UnlimitedOcrModel

    vision, _ = unlimited_ocr_reference(model)
    text = dict(
        vocab_size=32,
        hidden_size=model.config.projector_dim,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=8,
        n_shared_experts=1,
    )
    config = UnlimitedOcrConfig(vision_config=vision.config.to_dict(), text_config=text)
    reference = UnlimitedOcrModel(config).eval()
    state = {f"vision_tower.{k}": v for k, v in to_unlimited_ocr(model.state_dict()).items()}
    state["multi_modal_projector.weight"] = model.projector.weight
    state["multi_modal_projector.bias"] = model.projector.bias
    state["image_newline"] = model.image_newline
    state["view_separator"] = model.view_separator
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.startswith("language_model.") or "patch_embedding" in k for k in missing), missing
    return reference


def test_page_layout_matches_unlimited_ocr_model():
    model = random_model()
    reference = unlimited_ocr_full_reference(model)
    # page 0: 3 cols x 2 rows of 128-px tiles, page 1: untiled, page 2: 1 col x 2 rows
    grids = [(3, 2), (1, 1), (1, 2)]
    pixel_values = torch.randn(3, 3, 256, 256)
    tiles = torch.randn(8, 3, 128, 128)
    with torch.no_grad():
        ours = model(pixel_values=pixel_values, pixel_values_tiles=tiles, tile_grids=grids).image_embeds
        theirs = reference.get_image_features(
            pixel_values, pixel_values_local=tiles, num_local_patches=[6, 0, 2], patches_grid=grids
        ).pooler_output
    for page, (a, b, grid) in enumerate(zip(ours, theirs, grids)):
        assert a.shape == b.shape, page
        assert a.shape[0] == count_tokens((4, 4), grid, 2)
        assert rel_err(a, b) < 1e-4, page


def test_layout_order_with_labelled_tokens():
    """Tokens labelled by (tile, row, col) land where DeepSeek-OCR puts them."""
    cols, rows, side = 3, 2, 2
    tiles = torch.zeros(cols * rows, side * side, 3)
    for t in range(cols * rows):
        for r in range(side):
            for c in range(side):
                tiles[t, r * side + c] = torch.tensor([t, r, c])
    global_tokens = torch.full((4, 3), 100.0)
    newline, separator = torch.full((3,), -1.0), torch.full((3,), -2.0)
    seq = layout_page(global_tokens, (2, 2), newline, separator, tiles, (cols, rows))
    # first big-grid row: tile 0 row 0, tile 1 row 0, tile 2 row 0, then a newline
    expected_first_row = [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1], [2, 0, 0], [2, 0, 1], [-1, -1, -1]]
    assert seq[:7].tolist() == expected_first_row
    # third big-grid row starts with tile 3 (second tile row)
    assert seq[14].tolist() == [3, 0, 0]
    assert seq[-1].tolist() == [-2, -2, -2]
    assert len(seq) == count_tokens((2, 2), (cols, rows), side) == (side * rows) * (side * cols + 1) + 2 * 3 + 1
