"""A small training loop on `accelerate`: one or many processes, bf16 autocast, checkpoint and exact resume.

Batches are drawn from a deterministic stream: global position p = step * batch_size + j reads sample
`perm_e[p mod N]` with `perm_e = randperm(N, seed + e)`, e = p // N. Each process takes its contiguous share of
the global batch. So a run resumed at step s reads exactly the batches an uninterrupted run reads, and N processes
see together the batch one process sees.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .config import OptimConfig, TrainConfig

CHECKPOINT_PREFIX = "step-"


def _lr_scale(name: str, scales: dict[str, float]) -> float:
    """Multiplier of the longest `scales` prefix that `name` starts with (at a dot boundary), else 1."""
    best, scale = -1, 1.0
    for prefix, value in scales.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, scale = len(prefix), float(value)
    return scale


def build_optimizer(
    parameters: Sequence[nn.Parameter] | Sequence[tuple[str, nn.Parameter]], config: OptimConfig
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on 1-d tensors (norms, biases, embeddings rows).

    With (name, parameter) pairs, `config.lr_scale` multiplies the learning rate of parameters by name prefix
    (`{"vision": 0.5}`); a prefix that matches no trainable parameter is an error (a misspelt scale never passes
    silently)."""
    named = [item if isinstance(item, tuple) else ("", item) for item in parameters]
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: every parameter is frozen")
    scales = dict(config.lr_scale)
    unused = [prefix for prefix in scales if not any(n == prefix or n.startswith(prefix + ".") for n, _ in named)]
    if unused:
        raise ValueError(f"lr_scale prefix(es) {unused} match no trainable parameter")
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in named:
        groups.setdefault((_lr_scale(name, scales), param.ndim >= 2), []).append(param)
    return torch.optim.AdamW(
        [
            {"params": params, "lr": config.lr * scale, "weight_decay": config.weight_decay if decay else 0.0}
            for (scale, decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0]))
        ],
        lr=config.lr,
        betas=tuple(config.betas),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int):
    """Linear warmup, then cosine / linear decay to `min_lr_ratio` * lr, or constant."""
    if config.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {config.schedule!r}; choose cosine | linear | constant")

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sample_order(num_samples: int, seed: int, start: int, count: int, shuffle: bool = True) -> list[int]:
    """Dataset indices at global stream positions [start, start + count) (in index order when not `shuffle`)."""
    if not shuffle:
        return [position % num_samples for position in range(start, start + count)]
    out, cache = [], {}
    for position in range(start, start + count):
        epoch = position // num_samples
        if epoch not in cache:
            cache[epoch] = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(cache[epoch][position % num_samples]))
    return out


def _rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [version, torch.tensor(keys, dtype=torch.int64), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(int(k) for k in keys.tolist()), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    folder = Path(output_dir) / "checkpoints"
    candidates = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))
    candidates = [c for c in candidates if (c / "trainer_state.json").is_file()]
    return candidates[-1] if candidates else None


def save_loss_curve(
    history: Sequence[tuple[int, float]],
    path: str | Path,
    title: str = "training loss",
    evals: Sequence[dict[str, Any]] = (),
) -> None:
    """Loss per step (and a moving average) as a PNG; with `evals` (rows with `step`, `cer`, `cer_shuffled`,
    `exact_match`), a second panel beside it shows the held-out CER, the page-blind control's CER and the exact-match
    rate over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in history]
    losses = [v for _, v in history]
    if evals:
        figure, (axis, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=120)
        at = [row["step"] for row in evals]
        right.plot(at, [row["cer"] for row in evals], "o-", lw=1.6, label="CER (model)")
        right.plot(at, [row["cer_shuffled"] for row in evals], "s--", lw=1.2, label="CER (page-blind control)")
        right.plot(at, [row["exact_match"] for row in evals], "^:", lw=1.2, label="exact match")
        right.set_xlabel("step")
        right.set_ylim(0, max(1.05, max(row["cer_shuffled"] for row in evals) * 1.05))
        right.set_title(f"held-out pages ({evals[-1].get('pages', '?')})")
        right.grid(alpha=0.3)
        right.legend()
    else:
        figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


class Trainer:
    """Runs `loss_fn(model, batch)` for `config.max_steps` optimizer steps.

    Args:
        model: the module to train (a tower, a VLM wrapper, a masked-image model...).
        config: `TrainConfig`.
        dataset: indexable dataset; `collate(items, positions)` turns this process's items (and their global stream
            positions, usable as per-sample seeds) into a batch dict.
        loss_fn: `(model, batch) -> scalar loss`, the mean over this process's share of the batch.
        accelerator: an `accelerate.Accelerator`; one is made from the config when None.
        evaluate: `(trainer) -> dict of floats`, run on the main process every `eval_every` steps (e.g. held-out
            CER); the rows (with `step`) collect in `trainer.evals`, are checkpointed and written to `evals.jsonl`.
        eval_every: steps between evaluations (0: never during training).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        dataset: Dataset,
        collate: Callable[[list, list[int]], dict],
        loss_fn: Callable[[nn.Module, dict], torch.Tensor],
        accelerator=None,
        evaluate: Callable[[Trainer], dict[str, Any]] | None = None,
        eval_every: int = 0,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
        world = self.accelerator.num_processes
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes")
        self.local_batch = config.batch_size // world
        self.dataset, self.collate, self.loss_fn = dataset, collate, loss_fn
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.optimizer = build_optimizer(list(model.named_parameters()), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.max_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.evaluate, self.eval_every = evaluate, eval_every
        self.evals: list[dict[str, Any]] = []
        self.output_dir = Path(config.output_dir)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Model state (safetensors), optimizer, scheduler, step, loss history and RNG states."""
        from safetensors.torch import save_model

        path = Path(path) if path is not None else self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step}"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            save_model(self.unwrapped, str(path / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
            torch.save(_rng_state(), path / "rng.pt")
            state = {"step": self.step, "history": self.history, "evals": self.evals}
            (path / "trainer_state.json").write_text(json.dumps(state))
            self._prune()
        self.accelerator.wait_for_everyone()
        return path

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        folder = self.output_dir / "checkpoints"
        if keep <= 0 or not folder.is_dir():
            return
        done = sorted(
            (p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file()),
            key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
        )
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import load_model

        path = Path(path)
        load_model(self.unwrapped, str(path / "model.safetensors"), device=str(self.accelerator.device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step = int(state["step"])
        self.history = [tuple(item) for item in state["history"]]
        self.evals = list(state.get("evals", []))

    def maybe_resume(self) -> Path | None:
        resume = self.config.resume
        if resume in ("never", "", None):
            return None
        path = latest_checkpoint(self.output_dir) if resume == "auto" else Path(resume)
        if path is not None:
            self.load_checkpoint(path)
        return path

    # ------------------------------------------------------------------ loop
    def batch(self, step: int) -> dict:
        start = step * self.config.batch_size + self.accelerator.process_index * self.local_batch
        positions = list(range(start, start + self.local_batch))
        indices = sample_order(len(self.dataset), self.config.seed, start, self.local_batch, self.config.shuffle)
        batch = self.collate([self.dataset[i] for i in indices], positions)
        device = self.accelerator.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """Loss of this process's share and its backward; under DDP the gradients are then the global mean."""
        self.model.train()
        with self.accelerator.autocast():
            loss = self.loss_fn(self.model, batch)
        self.accelerator.backward(loss)
        return loss.detach()

    def optimizer_step(self) -> None:
        """Clip, step optimizer and scheduler, clear the gradients."""
        if self.config.optim.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run_evaluation(self) -> dict[str, Any] | None:
        """`evaluate(self)` on the main process (the others wait); appends `{"step": ..., **metrics}` to
        `self.evals` (replacing a row of the same step) and returns it."""
        row = None
        if self.evaluate is not None and self.accelerator.is_main_process:
            row = {"step": self.step, **self.evaluate(self)}
            self.evals = [r for r in self.evals if r["step"] != self.step] + [row]
        self.accelerator.wait_for_everyone()
        return row

    def write_evals(self) -> None:
        """`evals.jsonl` in the output folder: one row per evaluation (main process)."""
        if self.evals and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "evals.jsonl", "w") as handle:
                for row in self.evals:
                    handle.write(json.dumps(row) + "\n")

    def train_step(self, batch: dict) -> float:
        """One optimizer step; returns the loss averaged over processes."""
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return self.accelerator.reduce(loss.float(), "mean").item()

    def train(self, max_steps: int | None = None) -> list[tuple[int, float]]:
        """Train up to `max_steps` (default `config.max_steps`) total steps, saving every `save_every` steps and at
        the end. Returns the (step, loss) history (including steps before a resume)."""
        from tqdm.auto import tqdm

        stop = self.config.max_steps if max_steps is None else max_steps
        bar = tqdm(
            total=stop,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (self.config.progress and self.accelerator.is_main_process),
        )
        while self.step < stop:
            loss = self.train_step(self.batch(self.step))
            self.step += 1
            self.history.append((self.step, loss))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if bar.disable and self.config.log_every and self.step % self.config.log_every == 0:
                self.accelerator.print(f"step {self.step}: loss {loss:.4f}")
            if self.eval_every and self.step % self.eval_every == 0 and self.step < stop:
                row = self.run_evaluation()
                if row is not None:
                    shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
                    (bar.write if not bar.disable else self.accelerator.print)(f"step {self.step} eval: {shown}")
            if self.config.save_every and self.step % self.config.save_every == 0 and self.step < stop:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "loss.jsonl", "w") as handle:
                for step, loss in self.history:
                    handle.write(json.dumps({"step": step, "loss": loss}) + "\n")
            self.write_evals()
        return self.history


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Turn on per-block checkpointing in every `PreTrainedModel` inside `model` (the tower, the LM, also under
    PEFT wrappers). Returns how many models were switched."""
    from transformers import PreTrainedModel

    count = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x name
                module.activation_checkpointing_enable({"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            count += 1
    return count
