"""The peers of a parallel trial (runner/parallel.py), as the trainer sees them: who takes which rows, and the sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peers:
    """The processes that train one trial together.

    Each takes every `size`-th row of a step and of the eval set, from row `rank` on; losses are taken over the
    whole step's tokens, and gradients and losses are summed across the processes, so the step is the one a single
    GPU would take. Alone: rank 0 of 1, and nothing is sent anywhere.
    """

    rank: int = 0
    size: int = 1

    def share(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors if self.size == 1 else {k: v[self.rank::self.size] for k, v in tensors.items()}

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The tensor summed (or max-ed) over all processes, in place."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def first_says(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's flag, on every process (rank 0 alone answers to the worker: prune, stop)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=device)
        dist.broadcast(value, src=0)
        return bool(value.item())


ALONE = Peers()


def sum_gradients(model, step_loss: torch.Tensor, peers: Peers) -> torch.Tensor:
    """Add up the trainable gradients and the step loss of all peers (one all-reduce: LoRA's are a few MB)."""
    if peers.size == 1:
        return step_loss
    params = [p for p in model.parameters() if p.requires_grad]
    flat = peers.reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for p in params] + [step_loss.reshape(1).float()]))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    return flat[-1]
