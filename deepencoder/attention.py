"""Attention kernels, apart from the model math (transformers' `AttentionInterface`, timm's `layers/` habit).

The modeling files compute projections and position terms and call one function here; which kernel runs is chosen at
run time, per device, and is never saved as architecture. Two families:

- `attention(query, key, value, ...)`: softmax attention with an optional additive or boolean mask and grouped-query
  heads (fewer key/value heads than query heads). `eager` is the readable reference; `sdpa` is
  `scaled_dot_product_attention` (GQA without repeating K/V where the kernel takes `enable_gqa`).
- `rel_pos_attention(query, key, value, rel_h, rel_w, ...)`: SAM's decomposed relative-position bias
  (`rel_h[..., kh] + rel_w[..., kw]` added to the logits of query (qh, qw) on key (kh, kw)). Kernels:
  `eager` (materialised logits + bias, the reference), `mask` (the bias as SDPA's additive mask, built one
  (heads x query rows) block at a time, within a per-device budget) and `folded` (the bias appended to q and
  one-hot indicators to k, so a mask-free fused kernel runs).
- `mixed_attention(query, key, value, mask, num_image_tokens, ...)`: DeepEncoder V2's encoder over
  `[image tokens ; queries]` (image tokens see image tokens, query i sees image tokens and queries 0..i), with the
  mask from `mixed_attention_mask` built once per shape. `eager` applies the whole mask; `sdpa` runs the image rows
  mask-free and the query rows under the mask's query rows.

  `flex` is FlexAttention with the two (N, H) / (N, W) tables indexed in its `score_mod`: no N x N tensor, head
  dim unchanged (compiled kernels only; falls back to `mask` under export and for CPU backward).

Choosing: the config's `_attn_implementation` (`eager` | `sdpa`) picks the family member; among SDPA rel-pos kernels
`DEFAULT_REL_POS_KERNELS` maps the device type and the call's size to one (CPU: `mask`, measured fastest; CUDA:
`mask` for small calls, `folded` for large batches, from one H200 run; see the table's comment for what is measured
and what is not), and a model can be pinned to another with `model.set_attention_kernel("flex")`. New kernels
register with `register_rel_pos_kernel(name, fn)`; every kernel has the same contract and never mutates its inputs.
On the CPU in fp16/bf16 the `mask` kernel runs `half_precision_cpu_attention` (native half matmuls, fewer memory
passes) instead of PyTorch's fused kernel, which computes half precision in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFunction = Callable[..., torch.Tensor]
RelPosKernel = Callable[..., torch.Tensor]

# entries of one additive-mask block of the `mask` kernel, per device type, and (CPU) the query rows of one block. On
# the CPU a block is up to 1024 query rows of as many heads as 2**23 entries (32 MB in fp32) allow, split evenly: a
# 1024 px page's global block runs as 6 x 4 launches of 2 heads x 1024 rows and its 14 x 14 window blocks as 2
# launches of 6 heads (1 head at a time for a batch of 8 pages). Rows stay >= 768 so PyTorch's CPU flash kernel keeps
# its 256-row query tiles (shorter blocks drop to 64-row tiles, ~25% slower). The size trades cache against launches:
# 2**25 (6 heads, 96 MB masks, 8 launches) made every launch's mask leave the cache, 2**22 (1 head, 48 launches)
# pays a thread rendezvous per launch when the cores are busy. A whole real-size Base page on a 2-core Xeon VM, rounds
# alternating in one process (bit-identical outputs), 2**25 / 2**23 / 2**22: under glibc-tuned (what the CLI picks)
# 2 threads 5.09 / 4.89 / 4.86 s, 1 thread 9.83 / 9.53 / 9.42 s; under glibc's default allocator (a library user's
# process, where each large mask is a fresh mmap and its page faults) 2 threads 5.78 / 5.31 / 5.03 s, 1 thread
# 10.1 / 9.4 s (2**23), a batch of 4 pages 22.4 / 22.3 s, and with a third process spinning on one core 12.4 / 12.5
# / 13.2 s. (2**25 was chosen against 1 head x 1024 rows on a busy EPYC: the same CPU time on 1 thread, ~40% less
# on 2 busy threads.)
MASK_BLOCK_ELEMENTS: dict[str, int] = {"cpu": 2**23}
MASK_BLOCK_ROWS: dict[str, int] = {"cpu": 1024}
DEFAULT_MASK_BLOCK_ELEMENTS = 2**28
# fp16/bf16 on the CPU (`half_precision_cpu_attention`): smaller blocks, whose logits stay in cache between the
# matmul, the softmax and the value product: 2**22 entries (8 MB), a global block of a 1024 px page as 12 x 4
# launches of 1 head x 1024 rows. A bf16 Base page, interleaved runs on an AVX512-BF16 EPYC under glibc-tuned:
# 2 threads 1.91 s at 2**22, 2.05 s at 2**21, 1.96 s at 2**23, 2.17 s for the eager formula at the fp32 block shape;
# 1 thread 3.46 s at 2**21, ~3.6-3.8 s at 2**22 and 2**20, 4.2-4.4 s eager. Fewer, larger launches also suffer less
# on an oversubscribed machine, where each launch's thread rendezvous can wait for a time slice
HALF_MASK_BLOCK_ELEMENTS: dict[str, int] = {"cpu": 2**22}
# the default rel-pos kernel per device type and regime: (from this many query tokens per call, i.e. batch x tokens
# per view or window, kernel), ascending. CPU: `mask` at every size (`benchmarks/tower.py`: fastest in fp32 and, with
# the half-precision blocks, in bf16; `folded` triples the q.k and p.v work, FlexAttention's compiled CPU kernel
# measured 1.2x (bf16) to 1.9x (fp32) slower than `mask` on a 1024 px page's global block). CUDA, from the one H200
# run quoted in issue 20 (bf16, Base): `mask` at batch 1 (14.4 ms against `folded`'s 21.1 ms), `folded` at batch 32
# (170 against 141 pages/s); the crossover between is not measured (32768 tokens = 8 Base views is a guess), nor is
# `flex` on CUDA: `python -m benchmarks.tower --device cuda --dtype bf16` measures every kernel
DEFAULT_REL_POS_KERNELS: dict[str, tuple[tuple[int, str], ...]] = {
    "cpu": ((0, "mask"),),
    "cuda": ((0, "mask"), (32768, "folded")),
    "mps": ((0, "mask"),),
}


# ---------------------------------------------------------------------------------------------- plain / GQA attention
def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, N, hd) -> (B, kv_heads * groups, N, hd), each key/value head shared by `groups` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: softmax(q k^T * scale + mask) v with the softmax in fp32.

    query: (B, heads, Nq, hd); key/value: (B, kv_heads, Nk, hd), heads a multiple of kv_heads; attn_mask: additive
    (float) or boolean (True = attend), broadcastable to (B, heads, Nq, Nk). Returns (B, heads, Nq, hd).
    """
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    logits = (query * scale) @ key.transpose(-2, -1)  # (B, heads, Nq, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + attn_mask
    return logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype) @ value


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaled_dot_product_attention`, same contract as `eager_attention`; grouped key/value heads go in as they
    are (`enable_gqa`), so no repeated copy of K/V is made where the kernel supports it."""
    if query.shape[1] != key.shape[1]:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)


ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {"eager": eager_attention, "sdpa": sdpa_attention}


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    implementation: str | None = None,
) -> torch.Tensor:
    """Softmax attention through the kernel `implementation` names (`eager` | `sdpa`, default `sdpa`).
    query: (B, heads, Nq, hd), key/value: (B, kv_heads, Nk, hd) -> (B, heads, Nq, hd)."""
    return _lookup(ATTENTION_FUNCTIONS, implementation or "sdpa")(query, key, value, scale=scale, attn_mask=attn_mask)


# ------------------------------------------------------------------------------ decomposed relative-position bias
def rel_pos_mask(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """Materialise the additive bias: (B, heads, N, H), (B, heads, N, W) -> (B, heads, N, H*W)."""
    batch, heads, n, height = rel_h.shape
    width = rel_w.shape[-1]
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, n, height * width)


def eager_rel_pos_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """Reference: logits (B, heads, N, N) + the materialised bias, fp32 softmax. query/key/value: (B, heads, N, hd);
    rel_h: (B, heads, N, H); rel_w: (B, heads, N, W) -> (B, heads, N, hd)."""
    return eager_attention(query, key, value, scale=scale, attn_mask=rel_pos_mask(rel_h, rel_w))


def _static_tracing() -> bool:
    """True while torch.compile / torch.export / jit trace: blocked loops then take their functional form (no writes
    into a preallocated output) so graphs stay clean and batch sizes may be symbolic."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def half_precision_cpu_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, attn_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(mask + q k^T * scale) v for fp16/bf16 on the CPU, same contract as `eager_attention` with an additive
    mask and equal head counts.

    PyTorch's fused CPU kernel computes half-precision attention in fp32 (no faster than fp32), while its batched
    matmuls run natively (AVX512-BF16 / AMX), so this is the eager formula with its memory passes cut: the mask is
    the accumulator of one `baddbmm` (no separate logits + mask pass) and the softmax runs on the half-precision
    logits (PyTorch's CPU softmax accumulates in fp32 and rounds once, so no fp32 copy and cast-back pass). One
    rounding of the biased logits instead of two: closer to fp32 than the eager formula in half precision.
    """
    batch, heads, rows, head_dim = query.shape
    logits = torch.baddbmm(
        attn_mask.to(query.dtype).expand(batch, heads, rows, key.shape[2]).reshape(batch * heads, rows, -1),
        query.reshape(batch * heads, rows, head_dim),
        key.reshape(batch * heads, -1, head_dim).transpose(1, 2),
        alpha=scale,
    )  # (B * heads, rows, Nk)
    out = torch.bmm(logits.softmax(dim=-1), value.reshape(batch * heads, -1, value.shape[-1]))
    return out.view(batch, heads, rows, -1)


def masked_rel_pos_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    *,
    scale: float,
    mask_block_elements: int | None = None,
) -> torch.Tensor:
    """SDPA with the decomposed bias as an additive mask, built one (heads x query rows) block at a time.

    Same contract as `eager_rel_pos_attention`. Each block's mask (B, h, rows, N) holds at most `mask_block_elements`
    entries (default: `MASK_BLOCK_ELEMENTS` for the device; counted per batch element when the batch size is
    symbolic, as in a dynamic-batch export) and at most the device's `MASK_BLOCK_ROWS` query rows, so the full
    (B, heads, N, N) mask (805 MB per global block of a 1024 px page in fp32) need not exist; every block runs over
    all keys, so the result equals the one-shot masked call.
    Outside autograd and tracing the blocks are written into one fresh (B, N, heads, hd) buffer and its transposed
    view is returned, so the caller's `transpose(1, 2).reshape(B, N, C)` costs no copy.

    On the CPU in half precision each block runs `half_precision_cpu_attention` (blocks of
    `HALF_MASK_BLOCK_ELEMENTS`), with and without autograd: PyTorch's fused CPU kernel computes in fp32 there (no
    faster than the native bf16 matmuls) and cannot differentiate the mask (with autograd SDPA would fall back to its
    math backend, and training and inference would round differently).
    """
    batch, heads, n, head_dim = query.shape
    device = query.device.type
    budgets = MASK_BLOCK_ELEMENTS
    if device == "cpu" and query.dtype in (torch.float16, torch.bfloat16):
        attend, budgets = half_precision_cpu_attention, HALF_MASK_BLOCK_ELEMENTS
        # one copy of the projections (views of the qkv output) instead of one per block's matmul
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    else:
        attend = F.scaled_dot_product_attention
    budget = mask_block_elements or budgets.get(device, DEFAULT_MASK_BLOCK_ELEMENTS)
    per_row = key.shape[2] * (batch if isinstance(batch, int) else 1)
    rows = max(1, min(n, budget // per_row, MASK_BLOCK_ROWS.get(device, n)))
    head_blocks = -(-heads // max(1, min(heads, budget // (rows * per_row))))
    heads_per_block = -(-heads // head_blocks)  # the same number of heads in every block, the last one at most fewer
    if rows >= n and heads_per_block >= heads:
        return attend(query, key, value, attn_mask=rel_pos_mask(rel_h, rel_w), scale=scale)
    head_starts, row_starts = range(0, heads, heads_per_block), range(0, n, rows)

    def block(h: int, r: int) -> torch.Tensor:
        hs, rs = slice(h, h + heads_per_block), slice(r, r + rows)
        mask = rel_pos_mask(rel_h[:, hs, rs], rel_w[:, hs, rs])
        return attend(query[:, hs, rs], key[:, hs], value[:, hs], attn_mask=mask, scale=scale)

    if torch.is_grad_enabled() or _static_tracing():
        return torch.cat([torch.cat([block(h, r) for r in row_starts], dim=2) for h in head_starts], dim=1)
    out = query.new_empty(batch, n, heads, head_dim)
    for h in head_starts:
        for r in row_starts:
            out[:, r : r + rows, h : h + heads_per_block] = block(h, r).transpose(1, 2)
    return out.transpose(1, 2)


def folded_rel_pos_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """The decomposed bias folded into the dot product, so no (N x N) mask exists.

    q' = [q * scale, rel_h, rel_w] and k' = [k, onehot(row(k)), onehot(col(k))] give
    q'.k' = scale q.k + rel_h[row(k)] + rel_w[col(k)], exactly the biased logits; SDPA then runs mask-free with
    scale 1. `value` is zero-padded to the width of q'/k' (and the output sliced back): fused SDPA kernels need one
    head size for q, k and v and otherwise fall back to the unfused math path. Same contract as the others.
    """
    batch, heads, n, head_dim = key.shape
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    rows = torch.arange(height, device=key.device).repeat_interleave(width)
    cols = torch.arange(width, device=key.device).repeat(height)
    onehot_h = F.one_hot(rows, height).to(key.dtype)  # (N, H)
    onehot_w = F.one_hot(cols, width).to(key.dtype)  # (N, W)
    q_ext = torch.cat([query * scale, rel_h, rel_w], dim=-1)  # (B, heads, N, hd + H + W)
    k_ext = torch.cat([key, onehot_h.expand(batch, heads, n, height), onehot_w.expand(batch, heads, n, width)], dim=-1)
    v_ext = F.pad(value, (0, height + width))  # (B, heads, N, hd + H + W)
    return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=1.0)[..., :head_dim]


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """`flex_attention` under torch.compile, made on first use (FlexAttention's fused kernels exist only compiled:
    Triton on CUDA, a C++ template on the CPU; called eagerly it materialises the logits)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_rel_pos_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """FlexAttention with the decomposed bias added inside the kernel: its `score_mod` adds
    rel_h[b, h, q, k // W] + rel_w[b, h, q, k % W] to each logit, so neither an (N x N) mask nor wider heads exist.
    Same contract as the others.

    Outside torch.compile the call goes through a compiled `flex_attention` (one compile per shape, the first call
    of a shape takes seconds); inside it (`model.compile()`) it is traced into the caller's graph. Falls back to
    `masked_rel_pos_attention` (same result) where FlexAttention cannot run: under torch.export / jit tracing, and on
    the CPU while autograd records a tensor that requires grad (FlexAttention has no CPU backward).
    """
    if torch.compiler.is_exporting() or torch.jit.is_tracing() or _cpu_backward(query, key, value, rel_h, rel_w):
        return masked_rel_pos_attention(query, key, value, rel_h, rel_w, scale=scale)
    width = rel_w.shape[-1]

    def score_mod(score, b, h, q_index, k_index):
        return score + rel_h[b, h, q_index, k_index // width] + rel_w[b, h, q_index, k_index % width]

    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention
    else:
        flex_attention = _compiled_flex_attention()
    return flex_attention(query, key, value, score_mod=score_mod, scale=scale)


def _cpu_backward(*tensors: torch.Tensor) -> bool:
    return tensors[0].device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


REL_POS_KERNELS: dict[str, RelPosKernel] = {
    "eager": eager_rel_pos_attention,
    "mask": masked_rel_pos_attention,
    "folded": folded_rel_pos_attention,
    "flex": flex_rel_pos_attention,
}


def register_rel_pos_kernel(name: str, function: RelPosKernel) -> None:
    """Add a rel-pos kernel with `masked_rel_pos_attention`'s contract; `model.set_attention_kernel(name)` picks it."""
    REL_POS_KERNELS[name] = function


def default_rel_pos_kernel(device_type: str, tokens: int = 0) -> str:
    """The device type's default rel-pos kernel for a call over `tokens` query tokens (batch x tokens per view or
    window; `DEFAULT_REL_POS_KERNELS`). A symbolic count (dynamic-shape export) takes the smallest regime."""
    regimes = DEFAULT_REL_POS_KERNELS.get(device_type, ((0, "mask"),))
    if not isinstance(tokens, int):
        return regimes[0][1]
    return [name for start, name in regimes if tokens >= start][-1]


def rel_pos_kernel_name(
    device: torch.device, implementation: str | None = None, kernel: str | None = None, tokens: int = 0
) -> str:
    """Which rel-pos kernel runs: `eager` under the eager implementation, else the pinned `kernel`, else the
    device's default for a call over `tokens` query tokens."""
    if (implementation or "sdpa") == "eager":
        return "eager"
    return kernel or default_rel_pos_kernel(device.type, tokens)


def rel_pos_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    *,
    scale: float,
    implementation: str | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """Attention with SAM's decomposed rel-pos bias through the kernel `rel_pos_kernel_name` picks.
    query/key/value: (B, heads, N, hd); rel_h: (B, heads, N, H); rel_w: (B, heads, N, W) -> (B, heads, N, hd)."""
    name = rel_pos_kernel_name(query.device, implementation, kernel, query.shape[0] * query.shape[2])
    return _lookup(REL_POS_KERNELS, name)(query, key, value, rel_h, rel_w, scale=scale)


# ------------------------------------------------------- DeepEncoder V2: [image tokens ; queries] under the mixed mask
def mixed_attention_mask(num_image_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """DeepEncoder V2's mask over `[n image tokens ; n queries]`: (2n, 2n) bool, True where a row may attend. Image
    tokens see every image token and no query; query i sees every image token and queries 0..i."""
    n = num_image_tokens
    mask = torch.ones(2 * n, 2 * n, dtype=torch.bool, device=device)
    mask[:n, n:] = False
    mask[n:, n:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask


def eager_mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    num_image_tokens: int,
    *,
    scale: float,
) -> torch.Tensor:
    """Reference: the whole (2n, 2n) mask on materialised logits (`eager_attention`). query: (B, heads, 2n, hd);
    key/value: (B, kv_heads, 2n, hd); mask: `mixed_attention_mask(n)` -> (B, heads, 2n, hd)."""
    return eager_attention(query, key, value, scale=scale, attn_mask=mask)


def sdpa_mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    num_image_tokens: int,
    *,
    scale: float,
) -> torch.Tensor:
    """SDPA in two calls, same contract as `eager_mixed_attention`: the image rows attend to the image keys only, a
    mask-free call (the fused kernel, no (2n, 2n) logits); the query rows attend to all keys under the mask's query
    rows (n, 2n), a view of the mask built once per shape. Grouped K/V heads go in as they are (`sdpa_attention`).
    The image rows' key range is the mixed mask's definition; the mask's image rows are not read."""
    n = num_image_tokens
    image_rows = sdpa_attention(query[:, :, :n], key[:, :, :n], value[:, :, :n], scale=scale)
    query_rows = sdpa_attention(query[:, :, n:], key, value, scale=scale, attn_mask=mask[n:])
    return torch.cat([image_rows, query_rows], dim=2)


MIXED_ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {"eager": eager_mixed_attention, "sdpa": sdpa_mixed_attention}


def mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    num_image_tokens: int,
    *,
    scale: float,
    implementation: str | None = None,
) -> torch.Tensor:
    """DeepEncoder V2's encoder attention through the kernel `implementation` names (`eager` | `sdpa`, default
    `sdpa`). query: (B, heads, 2n, hd), key/value: (B, kv_heads, 2n, hd), mask: `mixed_attention_mask(n)`,
    num_image_tokens: n (a Python int) -> (B, heads, 2n, hd)."""
    function = _lookup(MIXED_ATTENTION_FUNCTIONS, implementation or "sdpa")
    return function(query, key, value, mask, num_image_tokens, scale=scale)


def _lookup(table: dict[str, Callable], name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown attention kernel {name!r}; registered: {sorted(table)}")
    return table[name]
