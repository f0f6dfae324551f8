"""Loading shared by both towers' model classes (`DeepEncoderModel`, `DeepEncoderV2Model`), and the cache of
position tables their stages derive from parameters per input size (`cached_positions`), and `model.compile()`
(`CompileMixin`).

- `from_pretrained`: transformers' own for this library's checkpoints; any other checkpoint holding the tower
  (DeepSeek-OCR / DeepSeek-OCR-2 releases, transformers' `UnlimitedOcr*` / `DeepseekOcr2*` `save_pretrained` in
  either naming) is converted on load, reading only the vision tensors, and one that holds no such tower is an
  error, never a randomly initialised model.
- `from_transformers`: a standalone tower on the vision parameters of a loaded transformers OCR model.

The model layer imports nothing above it: this file (with the rest of the model layer) is what `save_pretrained`
copies beside a checkpoint for `trust_remote_code=True` loading where `deepencoder` is not installed. Foreign
checkpoints come in through `CHECKPOINT_LOADERS`, which the conversion layer fills when the `deepencoder` package is
imported (`deepencoder.conversion.loaders`). Without it (the copied files alone), `from_pretrained` is transformers'
own and the converting loaders say that they need the package.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# name -> loader, registered by the conversion layer:
#   "pretrained": (model_class, path_or_repo_id, model_args, kwargs) -> model, or None for a checkpoint of this
#                 library (transformers' loading goes on)
#   "deepseek-ocr", "deepseek-ocr2": (model_class, path_or_repo_id, **keywords) -> model
#   "transformers": (model_class, transformers_model) -> model sharing its parameters
CHECKPOINT_LOADERS: dict[str, Callable[..., Any]] = {}


def register_checkpoint_loader(name: str, loader: Callable[..., Any]) -> None:
    """Make `loader` the one `name` refers to (see `CHECKPOINT_LOADERS`); a later registration replaces it."""
    CHECKPOINT_LOADERS[name] = loader


def checkpoint_loader(name: str) -> Callable[..., Any]:
    """The registered loader `name`; an ImportError saying what to install when none is (the model files copied
    beside a checkpoint run without the `deepencoder` package, whose conversion layer provides the loaders)."""
    try:
        return CHECKPOINT_LOADERS[name]
    except KeyError:
        raise ImportError(
            f"converting a checkpoint ({name}) needs the `deepencoder` package (pip install deepencoder, then "
            "`import deepencoder`); the model files saved beside a checkpoint load this library's own checkpoints only"
        ) from None


class TowerLoadingMixin:
    """Put before the `PreTrainedModel` base: its `from_pretrained` is the one reached through `super()`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, **kwargs: Any):
        """transformers' `from_pretrained` for this library's checkpoints (local folder or hub id); any other
        checkpoint holding this tower is converted on load when the `deepencoder` package is imported (see the
        module docstring, and `deepencoder.conversion.load.load_converted_pretrained` for the keywords a converted
        load takes: the hub's `revision`, `cache_dir`, `local_files_only`, `token`, `subfolder`, `force_download`
        included)."""
        loader = CHECKPOINT_LOADERS.get("pretrained")
        if loader is not None:
            converted = loader(cls, pretrained_model_name_or_path, model_args, kwargs)
            if converted is not None:
                return converted
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_transformers(cls, model: nn.Module):
        """A standalone tower on the vision parameters of a loaded transformers OCR model: `DeepEncoderModel` from
        `UnlimitedOcrForConditionalGeneration` / `UnlimitedOcrModel`, `DeepEncoderV2Model` from
        `DeepseekOcr2ForConditionalGeneration` / `DeepseekOcr2Model` (the other family is a `TypeError`). Its
        parameters are the model's own `nn.Parameter` objects (no copy, no second load); `model` is left untouched.
        It runs on this library's processor and saves as an ordinary DeepEncoder checkpoint. To make the
        transformers model itself run on this tower, see `deepencoder.integrations.attach`."""
        return checkpoint_loader("transformers")(cls, model)


# ------------------------------------------------------------------------------------------------ position tables
POSITION_CACHE_SIZE = 8  # entries per module: input sizes x dtypes x devices in recent use


def cached_positions(
    module: nn.Module, key: tuple, sources: tuple[torch.Tensor, ...], compute: Callable[[], Any]
) -> Any:
    """`compute()`, a position table derived from `sources` (a resized position embedding, a rel-pos table gathered
    for a grid size, RoPE tables) for the input size in `key`, kept on `module` and reused while nothing records an
    autograd graph.

    An entry is keyed by `key`, inference mode, and each source's storage, dtype, device and version counter, so
    `model.to(...)`, loading weights and any in-place update (an optimizer step) make the next call recompute. With
    autograd recording, under torch.compile / export (the graph holds the computation) and under jit tracing the
    table is computed afresh and not kept, as it is for weights created under inference mode (no version counter).
    The cache is not state: never saved, at most `POSITION_CACHE_SIZE` entries per module, least recently used
    dropped first. (The version counter, `Tensor._version`, is the one way PyTorch exposes in-place writes; autograd
    relies on the same counter.)
    """
    import torch  # on first use: this module is imported at start-up, before torch is needed

    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return compute()
    if any(t.is_inference() for t in sources):  # weights made under inference mode have no version counter
        return compute()
    stamp = tuple((t.untyped_storage().data_ptr(), t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    full_key = (key, torch.is_inference_mode_enabled(), stamp)
    cache: OrderedDict = module.__dict__.setdefault("_position_cache", OrderedDict())
    if full_key in cache:
        cache.move_to_end(full_key)
        return cache[full_key]
    value = compute()
    cache[full_key] = value
    while len(cache) > POSITION_CACHE_SIZE:
        cache.popitem(last=False)
    return value


# ------------------------------------------------------------------------------------------------ compiled shapes
COMPILE_CACHE_ENV = "DEEPENCODER_COMPILE_CACHE"
# torch.compile mode per device type (others: inductor's default). CUDA: GEMM autotuning without CUDA graphs,
# unmeasured against `reduce-overhead` (no GPU was available; `python -m benchmarks.tower --device cuda` times
# both). `reduce-overhead` replays CUDA graphs whose outputs live in a static pool that the next call overwrites, so
# a caller that keeps a batch's output past the next batch (the encode pipeline's writer does) has to clone it:
# pass mode="reduce-overhead" only where outputs are consumed before the next call
DEFAULT_COMPILE_MODES: dict[str, str] = {"cuda": "max-autotune-no-cudagraphs"}


class CompileMixin:
    """`model.compile()` / `model.uncompile()` for a tower whose compute is `encode_views` (same-size views ->
    tokens); `forward`'s batching and layout stay Python and call the compiled `encode_views`."""

    def compile(
        self,
        mode: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        dynamic: bool | None = False,
        views_per_call: int | None = None,
        **options: Any,
    ) -> None:
        """torch.compile `encode_views` in place: one graph per view size and batch size (`dynamic=False`, the
        fixed shapes a pipeline feeds; the first call of a shape compiles, later ones run the graph). `mode`:
        torch.compile's (default `DEFAULT_COMPILE_MODES` for the parameters' device); further keywords (`backend`,
        `fullgraph`, `options`) go to torch.compile.

        Compile cache between runs: with `cache_dir` (default `$DEEPENCODER_COMPILE_CACHE`, else none) the process's
        inductor and Triton caches live under it, so a second run on this machine loads the compiled kernels instead
        of building them (seconds instead of minutes), and after each new shape the portable cache artifacts
        (`torch.compiler.save_cache_artifacts`, autotuning results included) are written to
        `cache_dir/torch-<version>-<device>.bin` and loaded by `compile()` on another machine sharing the folder.
        Without it PyTorch's default local cache (under the temp directory) still applies.

        Shape-stable calls: with `views_per_call=N` the compiled graph always sees exactly N views. The views of a
        call are run in chunks of N, the last chunk filled up with zero views whose outputs are dropped, so a tower
        fed batches of varying size (the last batch of a run, Gundam pages with varying tile counts) compiles one
        graph per view size instead of one per count, and padding never appears in an output. Views are encoded
        independently of each other, so a view's tokens do not depend on what shares its chunk.
        """
        import torch

        if views_per_call is not None:
            _check_views_per_call(views_per_call)
        self.uncompile()
        device = next(self.parameters()).device.type
        mode = mode if mode is not None else DEFAULT_COMPILE_MODES.get(device)
        cache_dir = cache_dir if cache_dir is not None else os.environ.get(COMPILE_CACHE_ENV) or None
        artifacts = None
        if cache_dir is not None:
            cache_dir = Path(cache_dir).expanduser()
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")  # read at each compile
            os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
            artifacts = cache_dir / f"torch-{torch.__version__.replace('+', '-')}-{device}.bin"
            if artifacts.exists():
                torch.compiler.load_cache_artifacts(artifacts.read_bytes())
        compiled = torch.compile(type(self).encode_views.__get__(self), mode=mode, dynamic=dynamic, **options)
        seen: set = set()

        def encode_views(pixel_values, *args, **kwargs):
            size = encode_views.views_per_call  # may be lowered later (`set_views_per_call`)
            if size is not None and pixel_values.shape[0] != size:
                return run_in_chunks(encode_views, pixel_values, size, *args, **kwargs)
            out = compiled(pixel_values, *args, **kwargs)
            signature = (
                tuple(pixel_values.shape),
                pixel_values.dtype,
                pixel_values.device,
                args,
                tuple(kwargs.items()),
            )
            if artifacts is not None and signature not in seen:
                seen.add(signature)
                _save_cache_artifacts(artifacts)
            return out

        self._shadow_encode_views(encode_views, views_per_call, compiled=True)

    @property
    def views_per_call(self) -> int | None:
        """Views per `encode_views` call: exactly this many in a compiled tower (`compile(views_per_call=)`), at
        most this many in an eager one (`set_views_per_call`); None: every view of a call in one pass."""
        return getattr(self.__dict__.get("encode_views"), "views_per_call", None)

    def set_views_per_call(self, size: int | None) -> None:
        """Views per `encode_views` call from now on (None: no limit).

        Compiled tower: the fixed size of its graph (a pipeline halving its batches after running out of memory:
        the next call compiles the new size once). Eager tower: more than `size` views run in passes of `size`
        views, the last one shorter (no padding: an eager pass gains nothing from a fixed shape), so the
        activations of at most `size` views are alive at a time whatever a batch's tile count. Views are encoded
        independently: the outputs are those of one pass over all views. `compile()` and `uncompile()` reset it."""
        if size is not None:
            _check_views_per_call(size)
        wrapper = self.__dict__.get("encode_views")
        if getattr(wrapper, "compiled", False):
            wrapper.views_per_call = size
            return
        if size is None:
            self.__dict__.pop("encode_views", None)
            return
        method = type(self).encode_views.__get__(self)

        def encode_views(pixel_values, *args, **kwargs):
            limit = encode_views.views_per_call
            if limit is not None and pixel_values.shape[0] > limit:
                return run_in_chunks(method, pixel_values, limit, *args, pad=False, **kwargs)
            return method(pixel_values, *args, **kwargs)

        self._shadow_encode_views(encode_views, size, compiled=False)

    def _shadow_encode_views(self, wrapper: Callable, views_per_call: int | None, compiled: bool) -> None:
        """Install `wrapper` in place of the `encode_views` method until `uncompile()` (or, eager, a None limit)."""
        wrapper.__doc__ = type(self).encode_views.__doc__
        wrapper.views_per_call = views_per_call
        wrapper.compiled = compiled
        self.__dict__["encode_views"] = wrapper

    def uncompile(self) -> None:
        """Back to the plain eager `encode_views` (compiled graphs stay in torch's caches; no views-per-call
        limit)."""
        self.__dict__.pop("encode_views", None)


def _check_views_per_call(size: int) -> None:
    if size < 1:
        raise ValueError(f"views_per_call must be a positive number of views, got {size}")


def run_in_chunks(
    encode_views: Callable, pixel_values: torch.Tensor, size: int, *args: Any, pad: bool = True, **kwargs: Any
):
    """`encode_views` over (B, 3, H, W) views in calls of `size` views: exactly `size` with `pad` (the last call's
    views completed with zero views, whose rows are cut from every output tensor), else the last call shorter; the
    chunks' outputs joined along the view dimension (tensors and tuples of tensors; anything else, such as a token
    grid, taken from the first chunk)."""
    import torch

    count = pixel_values.shape[0]
    outputs = []
    for start in range(0, max(count, 1), size):  # no views: one call of padding, cut to zero rows
        chunk = pixel_values[start : start + size]
        real = chunk.shape[0]
        if real < size and pad:
            chunk = torch.cat([chunk, chunk.new_zeros((size - real, *chunk.shape[1:]))])
        outputs.append((encode_views(chunk, *args, **kwargs), real))
    first = outputs[0][0]
    joined = {}
    for name, value in first.items():
        if isinstance(value, torch.Tensor):
            joined[name] = torch.cat([out[name][:real] for out, real in outputs])
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            joined[name] = tuple(torch.cat([out[name][i][:real] for out, real in outputs]) for i in range(len(value)))
        else:
            joined[name] = value
    return type(first)(**joined)


def _save_cache_artifacts(path: Path) -> None:
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:  # nothing cacheable compiled (e.g. an eager backend)
        return
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(saved[0])
    temporary.replace(path)
