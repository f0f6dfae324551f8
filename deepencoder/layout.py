"""Token layout of a page: grids of tokens with `image_newline` after every row, local tiles stitched into one
big grid, then the global view, then `view_separator`. Also the closed-form token counts the processor reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def add_newlines(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """grid: (h, w, D), newline: (D,) -> (h * (w + 1), D), a newline token after each row."""
    h, _, dim = grid.shape
    return torch.cat([grid, newline.to(grid.dtype).expand(h, 1, dim)], dim=1).reshape(-1, dim)


def stitch_tiles(tiles: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    """tiles: (rows * cols, h, w, D) in row-major tile order -> one grid (rows * h, cols * w, D)."""
    _, h, w, dim = tiles.shape
    return tiles.reshape(rows, cols, h, w, dim).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, dim)


def layout_page(
    global_tokens: torch.Tensor,
    global_grid: tuple[int, int],
    newline: torch.Tensor,
    separator: torch.Tensor,
    tile_tokens: torch.Tensor | None = None,
    tile_grid: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """One page's token sequence.

    global_tokens: (h*w, D) for the global view of grid (h, w); tile_tokens: (cols*rows, th*tw, D) or None, each
    tile a square grid; tile_grid: (cols, rows). Returns [tiles rows + newlines] + [global rows + newlines] +
    [separator]: (num_tokens, D).
    """
    h, w = global_grid
    dim = global_tokens.shape[-1]
    parts = []
    if tile_tokens is not None and tile_tokens.shape[0] > 0:
        cols, rows = tile_grid
        side = round(tile_tokens.shape[1] ** 0.5)
        tiles = tile_tokens.reshape(cols * rows, side, side, dim)
        parts.append(add_newlines(stitch_tiles(tiles, cols, rows), newline))
    parts.append(add_newlines(global_tokens.reshape(h, w, dim), newline))
    parts.append(separator.to(global_tokens.dtype)[None])
    return torch.cat(parts, dim=0)


def count_tokens(global_grid: tuple[int, int], tile_grid: tuple[int, int] = (1, 1), tile_side: int = 0) -> int:
    """Length of `layout_page`'s output. global_grid: (h, w) tokens; tile_grid: (cols, rows); tile_side: tokens per
    tile side (0 or a 1x1 tile grid means no tiles)."""
    h, w = global_grid
    total = h * (w + 1) + 1
    cols, rows = tile_grid
    if tile_side and cols * rows > 1:
        total += (tile_side * rows) * (tile_side * cols + 1)
    return total


def layout_query_page(
    global_tokens: torch.Tensor, separator: torch.Tensor, tile_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """One page's token sequence in DeepEncoder V2's layout (query tokens are a sequence, not a grid: no newlines).

    global_tokens: (n, D); tile_tokens: (tiles, n_t, D) in row-major tile order, or None. Returns
    [every tile's tokens, tile by tile] + [global tokens] + [separator]: (tiles * n_t + n + 1, D).
    """
    parts = []
    if tile_tokens is not None and tile_tokens.shape[0] > 0:
        parts.append(tile_tokens.reshape(-1, tile_tokens.shape[-1]))
    parts.append(global_tokens)
    parts.append(separator.to(global_tokens.dtype)[None])
    return torch.cat(parts, dim=0)


def count_query_tokens(global_queries: int, num_tiles: int = 0, tile_queries: int = 0) -> int:
    """Length of `layout_query_page`'s output: global_queries + num_tiles * tile_queries + 1 (the separator)."""
    return global_queries + num_tiles * tile_queries + 1


def tile_counts(
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    tile_grids: Sequence[Sequence[int]] | None,
    pixel_values_tiles: torch.Tensor | None,
) -> tuple[list[tuple[int, int]], list[int]]:
    """Check a batch's tile inputs: its global views (a (B, 3, S, S) tensor or a list of B views), per page
    (cols, rows) as Python ints (None: no page tiled), and the tiles (T, 3, t, t) (None when absent). Returns the
    grids (one per page) and the tiles per page (0 for an untiled page, whose grid is (1, 1)); raises ValueError
    naming any mismatch."""
    batch = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else len(pixel_values)
    num_tiles = pixel_values_tiles.shape[0] if pixel_values_tiles is not None else None
    grids = [tuple(int(v) for v in g) for g in tile_grids] if tile_grids is not None else [(1, 1)] * batch
    if len(grids) != batch:
        raise ValueError(f"tile_grids has {len(grids)} entries for {batch} pages")
    counts = [c * r if c * r > 1 else 0 for c, r in grids]
    total = sum(counts)
    if total and num_tiles is None:
        raise ValueError(f"tile_grids asks for {total} tiles but pixel_values_tiles is missing")
    if num_tiles is not None and num_tiles != total:
        raise ValueError(f"pixel_values_tiles has {num_tiles} tiles, tile_grids asks for {total}")
    return grids, counts


def group_views_by_size(
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
) -> list[tuple[list[int], torch.Tensor]]:
    """Global views -> (page indices, stacked views) per distinct view size, so each size runs as one batch.
    pixel_values: (B, 3, H, W), or a list of (3, H_i, W_i) (or (1, 3, H_i, W_i)) views of different sizes."""
    if isinstance(pixel_values, torch.Tensor):
        return [(list(range(pixel_values.shape[0])), pixel_values)]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, view in enumerate(pixel_values):
        by_size.setdefault(tuple(view.shape[-2:]), []).append(index)
    return [
        (indices, torch.stack([pixel_values[i].reshape(pixel_values[i].shape[-3:]) for i in indices]))
        for indices in by_size.values()
    ]
