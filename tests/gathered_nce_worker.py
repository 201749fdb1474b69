"""Run by tests/test_engine.py under `torchrun --nproc_per_node=2`: rank 0 holds rows 0-2 of
a 5-row batch and rank 1 rows 3-4; prints how far the gathered InfoNCE loss and the averaged
gradients are from one process's on all 5 rows."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coreMethod import gathered_info_nce, info_nce  # noqa: E402
from utils import average_gradients  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
inputs = torch.randn(5, 6), torch.randn(5, 6)
layer = torch.nn.Linear(6, 4)
rows = slice(0, 3) if rank == 0 else slice(3, 5)


def encoded(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(layer(x), dim=-1)


loss = gathered_info_nce(encoded(inputs[0][rows]), encoded(inputs[1][rows]), 0.1)
loss.backward()
average_gradients(layer.parameters())
total = torch.tensor([loss.item()])
dist.all_reduce(total)  # rank losses sum to world x the global mean
if rank == 0:
    shared = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    alone = info_nce(encoded(inputs[0]), encoded(inputs[1]), 0.1)
    alone.backward()
    print(json.dumps({
        "loss_difference": abs(float(total) / 2 - alone.item()),
        "gradient_difference": max(float((a - p.grad).abs().max())
                                   for a, p in zip(shared, layer.parameters()))}))
dist.barrier()
# gloo's teardown aborts a rank now and then ('terminate called without an active
# exception'): leave without running it, the result being written
sys.stdout.flush()
os._exit(0)
