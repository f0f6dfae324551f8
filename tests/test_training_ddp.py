"""A 2-process gloo DDP step (through `accelerate`) equals the 1-process step on the same global batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from helpers import rel_err

STEPS = 2


class _EqualLengthPages(torch.utils.data.Dataset):
    """Pages whose texts all have the same number of tokens, so the per-process token means average to the
    global token mean (the equivalence DDP's gradient averaging relies on)."""

    def __init__(self) -> None:
        from deepencoder.training import SyntheticPages

        self.pages = SyntheticPages(num_samples=8, size=(128, 128), seed=3)

    def __len__(self) -> int:
        return len(self.pages)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.pages[index]["image"], "text": f"page {index:02d} ok"}


def _run(output_dir: str):
    """Build the same tower + LM + trainer in this process; return (losses, state_dict) after STEPS steps."""
    from accelerate import Accelerator

    from deepencoder.training import OcrFinetuneConfig, Trainer, build_ocr_run, ocr_loss

    config = OcrFinetuneConfig()
    config.train.output_dir, config.train.batch_size, config.train.progress = output_dir, 4, False
    config.train.max_steps, config.train.resume = STEPS, "never"
    config.train.optim.lr, config.train.optim.max_grad_norm = 1e-2, None
    config.data.num_samples, config.data.base_size = 8, 128
    model, _, collate, _, _ = build_ocr_run(config)
    trainer = Trainer(model, config.train, _EqualLengthPages(), collate, ocr_loss, Accelerator())
    losses, grads = [], []
    for step in range(STEPS):
        loss = trainer.forward_backward(trainer.batch(step))
        losses.append(trainer.accelerator.reduce(loss.float(), "mean").item())
        grads.append({n: p.grad.detach().clone() for n, p in trainer.unwrapped.named_parameters()})
        trainer.optimizer_step()
    return losses, grads, {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def _worker(rank: int, world: int, port: int, output_dir: str, result_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    losses, grads, state = _run(output_dir)
    if rank == 0:
        torch.save({"losses": losses, "grads": grads, "state": state}, result_path)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def test_two_process_gloo_step_equals_one_process(tmp_path):
    result = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(result)), nprocs=2, join=True)
    losses, grads, state = _run(str(tmp_path / "single"))
    ddp = torch.load(result, weights_only=True)
    print(f"DDP losses {ddp['losses']} vs 1-process {losses}")
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(ddp["losses"], losses))
    # step 0: all-reduced halves vs the whole batch on identical weights, fp32 summation order only (1e-5).
    # step 1 runs on weights after one AdamW step, which turns ~1e-7 gradient differences of near-zero entries into
    # ~lr * 1e-3 weight differences, so its gradients agree to 1e-3 only.
    for step, (ddp_grads, single_grads) in enumerate(zip(ddp["grads"], grads)):
        assert ddp_grads.keys() == single_grads.keys()
        errors = {k: rel_err(ddp_grads[k], single_grads[k]) for k in single_grads}
        name = max(errors, key=errors.get)
        worst = errors[name]
        print(f"step {step}: max relative gradient difference DDP vs 1-process = {worst:.2e} ({name})")
        assert worst <= (1e-5 if step == 0 else 1e-3)
    # AdamW's first steps move each weight by ~lr * sign(grad), so weights agree to a few lr * 1e-3
    worst = max((ddp["state"][k] - state[k]).abs().max().item() for k in state)
    print(f"max |weight difference| after {STEPS} AdamW steps (lr 1e-2) = {worst:.2e}")
    assert worst <= 1e-3
