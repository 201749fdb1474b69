"""Run by tests/test_engine.py under `torchrun --nproc_per_node=2`: contrastive fine-tuning of
the tiny RoBERTa on the demo data on 2 gloo ranks, the validation probe replaced by a rising
counter (so the last step is kept); rank 0 saves the weights.
Arguments: tiny model folder, data root, output .npz, fine-tuning settings (JSON)."""
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataHandler import open_dataset  # noqa: E402
from model.config import FinetuneConfig  # noqa: E402
from model.contrastive import ValidationProbe, finetune_encoder  # noqa: E402
from model.text import TextEncoder  # noqa: E402

model_folder, data_root, out, settings = sys.argv[1:5]
dist.init_process_group("gloo")
counter = itertools.count()
ValidationProbe.recall = lambda self, encoder: float(next(counter))
encoder = TextEncoder.from_pretrained(model_folder, layers=2, batch_size=8)
for module in encoder.model.modules():
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
if dist.get_rank() == 0:
    dataset = open_dataset("demo", data_root)  # rank 0 writes the demo files once
dist.barrier()
dataset = open_dataset("demo", data_root)
tuned, _ = finetune_encoder(encoder, dataset, "full", FinetuneConfig(**json.loads(settings)), 5)
if dist.get_rank() == 0:
    np.savez(out, **{k: v.numpy() for k, v in tuned.model.state_dict().items()})
dist.barrier()
# gloo's teardown aborts a rank now and then ('terminate called without an active
# exception'): leave without running it, the result being written
sys.stdout.flush()
os._exit(0)
