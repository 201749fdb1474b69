"""Data-parallel training on Ray Train's `TorchTrainer` (gloo on CPU, NCCL on GPUs): the
pipeline's encoder fine-tuning (`finetune`), Wide&Deep ranker (`ranker_train_loop`),
GraphSAGE, LightGCN and SimGCL (`graph_train_loop`) when the run has `--engine ray --workers N`,
and `main.py ddp-check` (also under `torchrun --nproc_per_node=N`), DistributedDataParallel
over gloo on the CPU (the check compares with one CPU process, GPU or not). Rank 0 hands a
result back as its Ray Train checkpoint, persisted to the engine's storage (`--ray-storage`
on a cluster of several nodes).

Each global batch is split into one share per rank (whole users under the ranker's softmax
loss), each rank's loss scaled so that the averaged gradients are one process's gradient on
the whole global batch. `data_parallel_check` measures exactly that on a seeded ranking problem: the
gradient of the first step and the weights after a few Adam steps, against one process."""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from model.contrastive import finetune_encoder
from model.ranking import WideDeep
from model.ranking_features import RankingFeatures
from model.text import TextEncoder
from utils import log, pick_device

USERS, ITEMS, DIM = 300, 200, 16


def ranking_problem(seed: int, pairs: int) -> tuple[RankingFeatures, dict, torch.Tensor]:
    """A seeded ranker input (every rank builds the same one): features of a random
    interaction matrix and channel, `pairs` labelled pairs."""
    rng = np.random.default_rng(seed)
    train = sp.random(USERS, ITEMS, density=0.05, format="csr", random_state=seed)
    signals = {"als": (rng.normal(size=(USERS, DIM)).astype(np.float32),
                       rng.normal(size=(ITEMS, DIM)).astype(np.float32))}
    features = RankingFeatures(train, signals, "als", n_segments=4, seed=seed)
    users, items = rng.integers(USERS, size=pairs), rng.integers(ITEMS, size=pairs)
    batch = features.build(users, items, rng.integers(1, 200, size=pairs))
    labels = torch.as_tensor(rng.random(pairs) < 0.2, dtype=torch.float32)
    return features, batch, labels


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes in the environment
    (Ray Train has already joined one)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # the check runs on the CPU, GPU or not
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_steps(net: torch.nn.Module, batch: dict, labels: torch.Tensor, steps: int,
                global_batch: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """`steps` Adam steps over consecutive global batches; this rank takes its slice of
    each. Returns the first step's gradients (averaged over ranks by DDP)."""
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    share = global_batch // world
    first = []
    for step in range(steps):
        start = step * global_batch + rank * share
        rows = slice(start, start + share)
        loss = loss_fn(model({k: v[rows] for k, v in batch.items()}), labels[rows])
        optimiser.zero_grad()
        loss.backward()
        if step == 0:
            first = [p.grad.detach().clone().numpy() for p in net.parameters()]
        optimiser.step()
    return first


def data_parallel_check(config: dict) -> dict:
    """Runs on every rank; rank 0 compares with one process on the same global batches and
    writes the differences to config['out'] (when given) and returns them."""
    rank, world = _distributed()
    seed, steps, global_batch = config.get("seed", 0), config.get("steps", 5), \
        config.get("global_batch", 512)
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} workers")
    features, batch, labels = ranking_problem(seed, steps * global_batch)

    def fresh() -> WideDeep:
        torch.manual_seed(seed)
        return WideDeep(features)

    net = fresh()
    gradients = train_steps(net, batch, labels, steps, global_batch, rank, world)
    if rank != 0:
        return {}
    alone = fresh()
    alone_gradients = train_steps(alone, batch, labels, steps, global_batch)
    report = {"workers": world, "global_batch": global_batch, "steps": steps,
              "first_step_gradient_max_abs_difference": max(
                  float(np.abs(a - b).max()) for a, b in zip(gradients, alone_gradients)),
              "weights_after_steps_max_abs_difference": max(
                  float((a - b).detach().abs().max()) for a, b in zip(net.parameters(),
                                                                      alone.parameters())),
              "gradient_scale": max(float(np.abs(g).max()) for g in alone_gradients)}
    if config.get("out"):
        Path(config["out"]).write_text(json.dumps(report))
    return report


@contextmanager
def _trained_on_ray(worker, job: dict, workers: int, storage: str | None = None):
    """Runs `worker(job)` on `workers` Ray Train workers (TorchTrainer: gloo on CPU, NCCL
    when the cluster has a GPU per worker) and yields the folder rank 0 handed back with
    `_hand_back`: its Ray Train checkpoint, persisted under `storage` (a folder every node
    reaches, or a URI such as s3://...; a temporary folder of this machine without one) and
    read here. A local Ray instance is started for it if none runs."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    # one GPU per worker, or none: a run on a GPU machine with fewer GPUs than workers
    # trains its workers on the CPUs rather than waiting for GPUs that never come
    use_gpu = bool(job.get("use_gpu")) and ray.cluster_resources().get("GPU", 0) >= workers
    if job.get("use_gpu") and not use_gpu:
        log(f"note: fewer GPUs than --workers {workers}: the Ray Train workers run on CPUs")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            name = f"{worker.__name__.strip('_')}-{time.strftime('%Y%m%d-%H%M%S')}-" \
                f"{uuid.uuid4().hex[:6]}"  # never an earlier run's folder in shared storage
            result = TorchTrainer(
                worker, train_loop_config=job,
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                run_config=RunConfig(name=name, storage_path=storage or scratch)).fit()
            if result.checkpoint is None:
                raise RuntimeError(f"Ray Train run {name} handed no result back")
            try:
                with result.checkpoint.as_directory() as folder:
                    yield Path(folder)
            finally:
                _remove_run(result)
    finally:
        if started_here:
            ray.shutdown()


def _remove_run(result) -> None:
    """Deletes a Ray Train run's folder from its storage once its result is read (the run
    made it; a shared storage would otherwise keep a copy of every model ever trained)."""
    result.filesystem.delete_dir(result.path)


def _hand_back(write) -> None:
    """Ends a Ray Train worker: rank 0 writes its result with `write(folder)` and reports
    the folder as a checkpoint (Ray Train persists it to the run's storage, where
    `_trained_on_ray` reads it); every rank reports once, as Ray Train requires."""
    import ray.train

    if dist.get_rank() != 0:
        ray.train.report({}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _check_worker(config: dict) -> None:
    report = data_parallel_check(config)
    _hand_back(lambda folder: (folder / "report.json").write_text(json.dumps(report)))


def run_on_ray(config: dict, workers: int) -> dict:
    """`data_parallel_check` on `workers` Ray Train workers (gloo on CPU); rank 0 hands its
    report back as its checkpoint."""
    with _trained_on_ray(_check_worker, config, workers) as folder:
        return json.loads((folder / "report.json").read_text())


def ray_workers(engine) -> int:
    """How many Ray Train workers `engine` trains with (1: train in this process). The
    workers hand their result back through the engine's storage (`--ray-storage`): a
    cluster of several nodes without one trains in this process (and says so)."""
    if engine is None or engine.name != "ray" or engine.workers < 2:
        return 1
    import ray

    if sum(node.get("Alive", False) for node in ray.nodes()) > 1 and not engine.storage:
        log("note: on a cluster of several nodes, data-parallel training needs storage "
            "every node reaches for its result (--ray-storage: a shared folder or a URI "
            "such as s3://bucket/path); without it, training runs in this process")
        return 1
    return engine.workers


def ranker_train_loop(engine):
    """The Wide&Deep ranker's training loop for `engine` (`WideDeepRanker.fit(...,
    train_loop=)`): on Ray Train with several workers, else None (this process)."""
    workers = ray_workers(engine)
    if workers < 2:
        return None

    def on_ray(ranker, pairs, check, validation, device: str) -> dict:
        ranker.net.to("cpu")  # pickled for the workers: any of them can read it
        job = {"ranker": ranker, "pairs": pairs, "check": check, "validation": validation,
               "use_gpu": str(device).startswith("cuda")}
        with _trained_on_ray(_ranker_worker, job, workers, engine.storage) as folder:
            ranker.net.load_state_dict(torch.load(folder / "state.pt", weights_only=True))
            log_ = json.loads((folder / "log.json").read_text())
        ranker.net.to(device)
        ranker.kept_recall_order = log_["kept_recall_order"]
        return {**log_, "workers": workers}
    return on_ray


def _ranker_worker(job: dict) -> None:
    from ray.train.torch import get_device

    ranker = job["ranker"]
    ranker.net.to(get_device())
    log_ = ranker.train_loop(job["pairs"], job["check"], job["validation"], str(get_device()))

    def write(folder: Path) -> None:
        torch.save({k: v.cpu() for k, v in ranker.net.state_dict().items()},
                   folder / "state.pt")
        (folder / "log.json").write_text(json.dumps(log_))
    _hand_back(write)


def graph_train_loop(engine):
    """GraphSAGE's, LightGCN's or SimGCL's training for `engine` (`fit(..., train_loop=)`): on
    Ray Train with several workers (each rank takes its share of every global BPR batch;
    GraphSAGE with --sage-fanout over its own sampled neighbourhoods), else None (this
    process)."""
    workers = ray_workers(engine)
    if workers < 2:
        return None

    def on_ray(model, dataset, *inputs):
        job = {"model": model, "dataset": dataset, "inputs": inputs,
               "use_gpu": pick_device(model.device).startswith("cuda")}
        with _trained_on_ray(_graph_worker, job, workers, engine.storage) as folder:
            fitted = {**json.loads((folder / "fitted.json").read_text()),
                      "net": torch.load(folder / "net.pt", weights_only=True),
                      "vectors": (np.load(folder / "users.npy"), np.load(folder / "items.npy"))}
        model.adopt(fitted, dataset)
        model.training_log["workers"] = workers
        return model
    return on_ray


def _graph_worker(job: dict) -> None:
    from ray.train.torch import get_device

    model = job["model"]
    model.device = str(get_device())
    model.fit(job["dataset"], *job["inputs"])
    fitted = model.fitted_state()

    def write(folder: Path) -> None:  # no pickle: the storage may be shared
        torch.save(fitted["net"], folder / "net.pt")
        np.save(folder / "users.npy", fitted["vectors"][0])
        np.save(folder / "items.npy", fitted["vectors"][1])
        (folder / "fitted.json").write_text(json.dumps(
            {"state": fitted["state"], "training_log": fitted["training_log"]}))
    _hand_back(write)


def finetune(encoder, dataset, method: str, config, seed: int, engine=None):
    """Contrastive fine-tuning of `encoder` (`model.contrastive.finetune_encoder`): on a Ray
    engine with several workers, data-parallel on Ray Train (`finetune_on_ray`); else here."""
    workers = ray_workers(engine)
    if workers > 1:
        return finetune_on_ray(encoder, dataset, method, config, seed, workers,
                               engine.storage)
    return finetune_encoder(encoder, dataset, method, config, seed)


def _finetune_worker(job: dict) -> None:
    """One Ray Train worker of `finetune_on_ray`: the same loop as one process, on this
    rank's share of every global batch; rank 0 saves the result."""
    from ray.train.torch import get_device

    encoder = job["encoder"]
    encoder.model.to(get_device())
    encoder.device = str(get_device())
    tuned, log_ = finetune_encoder(encoder, job["dataset"], job["method"], job["config"],
                                   job["seed"])

    def write(folder: Path) -> None:
        tuned.save(folder / "encoder")
        (folder / "log.json").write_text(json.dumps(log_))
    _hand_back(write)


def finetune_on_ray(encoder, dataset, method: str, config, seed: int, workers: int,
                    storage: str | None = None):
    """`finetune_encoder` data-parallel on `workers` Ray Train workers: each global batch is
    drawn as in one process and split over the ranks, negatives are gathered across them,
    gradients averaged. Returns (encoder, log) as `finetune_encoder` does; rank 0 hands the
    result back as its checkpoint (under `storage`, see `_trained_on_ray`)."""
    device = encoder.device
    encoder.model.to("cpu")  # pickled for the workers: any of them can read it
    try:
        job = {"encoder": encoder, "dataset": dataset, "method": method, "config": config,
               "seed": seed, "use_gpu": str(device).startswith("cuda")}
        with _trained_on_ray(_finetune_worker, job, workers, storage) as folder:
            tuned = TextEncoder.from_pretrained(str(folder / "encoder"), device=device)
            log_ = json.loads((folder / "log.json").read_text())
    finally:
        encoder.model.to(device)
    tuned.name, tuned.recipe = f"{encoder.name}+{method}", None
    return tuned, {**log_, "workers": workers}
