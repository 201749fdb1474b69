"""The Ray engine gives the local engine's results: encoding, retrieval, per-user metrics and
a whole run; data-parallel ranker training (torchrun and Ray Train, 2 gloo workers) equals
one process at the same global batch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import scipy.sparse as sp
from click.testing import CliRunner

from conftest import CORPUS, ROOT


@pytest.fixture(scope="module")
def ray_engine():
    from model.engine import RayEngine

    engine = RayEngine(workers=2)
    yield engine
    engine.close()


def test_ray_encoding_equals_local(ray_engine, tiny_roberta):
    from model.text import TextEncoder

    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, quantize=True,
                                          batch_size=4)
    texts = [f"{text} ({n})" for n in range(4) for text in CORPUS]
    local = encoder.encode(texts, show_progress=False)
    np.testing.assert_allclose(ray_engine.encode(encoder, texts), local, atol=1e-5)


def test_sharded_retrieval_and_metrics_equal_local(ray_engine):
    from evaluation import Evaluator
    from model.base import Recommender

    rng = np.random.default_rng(0)
    seen = sp.random(5000, 300, density=0.03, format="csr", random_state=1)  # 3 query chunks
    truth = sp.random(5000, 300, density=0.02, format="csr", random_state=2)
    model = Recommender()
    model.user_vectors = rng.normal(size=(5000, 16)).astype(np.float32)
    model.item_vectors = rng.normal(size=(300, 16)).astype(np.float32)
    model.seen = (seen > 0).astype(np.float32)
    local, sharded = Evaluator(truth, seen), Evaluator(truth, seen, engine=ray_engine)
    top = local.top_of(model)
    assert np.array_equal(sharded.top_of(model), top)
    assert not (np.isin(top[0], seen[local.users[0]].indices)).any()  # seen items left out
    pd.testing.assert_frame_equal(sharded.per_user(top), local.per_user(top))


def _run(tmp_path, engine: str) -> dict:
    from main import cli

    runs = tmp_path / engine
    args = ["run", "--model", "als,text", "--no-tune-baselines", "--engine", engine,
            "--runs-dir", str(runs), "--cache-dir", str(tmp_path / f"cache-{engine}")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert ("encoded by 2 Ray actors" in result.output) == (engine == "ray")
    metrics = json.loads(next(runs.glob("demo/*/metrics.json")).read_text())
    return {name: row["metrics"] for name, row in metrics["variants"].items()}


def test_a_run_on_ray_gives_the_local_metrics(ray_engine, tmp_path):
    # separate embedding caches: the Ray run really encodes on its workers, where a
    # one-thread matrix product may round the last bit differently: text within 1e-4
    on_ray, local = _run(tmp_path, "ray"), _run(tmp_path, "local")
    assert on_ray["als"] == local["als"]
    for metric, value in local["text"].items():
        assert on_ray["text"][metric] == pytest.approx(value, abs=1e-4), metric


def _assert_equal_training(report: dict, workers: int) -> None:
    assert report["workers"] == workers
    scale = report["gradient_scale"]
    assert scale > 0
    assert report["first_step_gradient_max_abs_difference"] <= 1e-5 * scale
    assert report["weights_after_steps_max_abs_difference"] <= 1e-5


def test_torchrun_data_parallel_equals_one_process():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "main.py", "ddp-check", "--steps", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_equal_training(json.loads(done.stdout.strip().splitlines()[-1]), 2)


def test_ray_train_data_parallel_equals_one_process(ray_engine):
    from model.ddp import run_on_ray

    _assert_equal_training(run_on_ray({"seed": 1, "steps": 3, "global_batch": 256}, 2), 2)




def test_gathered_info_nce_gradients_equal_one_process():
    """Two gloo ranks holding 3 and 2 rows of a batch: gathered negatives and averaged
    gradients are one process's InfoNCE gradients on the 5 rows."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(ROOT / "tests" / "gathered_nce_worker.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loss_difference"] < 1e-6 and report["gradient_difference"] < 1e-6


def _demo_and_encoder(tiny_roberta, data_root):
    from dataHandler import open_dataset
    from model.text import TextEncoder

    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, batch_size=8)
    for module in encoder.model.modules():  # dropout would draw other masks per rank
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return open_dataset("demo", data_root), encoder


FT_SETTINGS = {"ft_steps": 4, "ft_eval_every": 2, "ft_batch": 8, "ft_lr": 5e-3}


def test_data_parallel_fine_tuning_equals_one_process(tiny_roberta, tmp_path, monkeypatch):
    """Fine-tuning on 2 gloo ranks (torchrun), each encoding its half of every global batch
    with negatives gathered from both, ends at one process's weights (the probe is replaced
    by a rising counter, so the last step's weights are kept and compared)."""
    from model.config import FinetuneConfig
    from model.contrastive import ValidationProbe, finetune_encoder

    out = tmp_path / "ranks.npz"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(ROOT / "tests" / "ddp_finetune_worker.py"), str(tiny_roberta),
                           str(tmp_path / "data"), str(out), json.dumps(FT_SETTINGS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = iter(range(100))
    monkeypatch.setattr(ValidationProbe, "recall", lambda self, encoder: float(next(steps)))
    dataset, encoder = _demo_and_encoder(tiny_roberta, tmp_path / "data")
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    alone, log_ = finetune_encoder(encoder, dataset, "full", FinetuneConfig(**FT_SETTINGS), 5)
    assert log_["best_step"] == 4
    shared = np.load(out)
    weights = alone.model.state_dict()
    difference = np.concatenate([np.abs(shared[k] - v.numpy()).ravel() for k, v in weights.items()])
    movement = np.concatenate([np.abs(v - before[k]).numpy().ravel() for k, v in weights.items()])
    # Adam turns float noise in a gradient near zero into a whole step, so a few weights of
    # a nearly dead unit differ; the rest match to 1e-5 of a movement ~1e2 times larger
    assert (difference <= 1e-5).mean() > 0.995 and difference.max() < 1e-3
    assert np.median(movement) > 1e-3  # full fine-tuning: the weights did move


def test_fine_tuning_on_ray_train_equals_one_process(ray_engine, tiny_roberta, tmp_path):
    """`finetune` with a 2-worker Ray engine runs the same loop on Ray Train's TorchTrainer
    and hands back the encoder and log of one process."""
    from model.config import FinetuneConfig
    from model.contrastive import finetune_encoder
    from model.ddp import finetune

    config = FinetuneConfig(**FT_SETTINGS)
    dataset, encoder = _demo_and_encoder(tiny_roberta, tmp_path / "d")
    alone, alone_log = finetune_encoder(encoder, dataset, "bitfit", config, 5)
    encoder = _demo_and_encoder(tiny_roberta, tmp_path / "d")[1]
    shared, shared_log = finetune(encoder, dataset, "bitfit", config, 5, ray_engine)
    assert shared_log["workers"] == 2 and shared_log["pairs"] == alone_log["pairs"]
    assert [h["val_recall@20"] for h in shared_log["history"]] == \
        [h["val_recall@20"] for h in alone_log["history"]]  # rank 0 probed the same weights
    for (name, a), b in zip(alone.model.state_dict().items(), shared.model.state_dict().values()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=2e-5, err_msg=name)
    assert shared.name.endswith("+bitfit") and shared.quantize == encoder.quantize


def test_ranker_training_on_ray_train_equals_one_process(ray_engine, tmp_path):
    """`--engine ray --workers 2` trains the Wide&Deep ranker on Ray Train, each rank taking
    half of every global batch: the same weights and ranked lists as one process."""
    from dataHandler import open_dataset
    from model import WideDeepRanker
    from model.ddp import ranker_train_loop
    from model.tuning import tuned

    data = open_dataset("demo", tmp_path)
    recall = tuned("als", data, {"seed": 0}, tune=False)

    def ranker() -> WideDeepRanker:
        return WideDeepRanker(candidates=30, epochs=3, batch=256, device="cpu", members=2)
    alone = ranker().fit(data, recall)
    shared = ranker().fit(data, recall, ranker_train_loop(ray_engine))
    assert shared.training_log["workers"] == 2
    assert shared.training_log["best_epoch"] == alone.training_log["best_epoch"]
    for one, two in zip(alone.training_log["history"], shared.training_log["history"],
                        strict=True):  # float noise grows over the Adam steps
        assert abs(one["val_ndcg@20"] - two["val_ndcg@20"]) < 1e-4
    assert len(alone.nets) == len(shared.nets) >= 1
    for one, two in zip(alone.nets, shared.nets):
        weights = [torch.cat([v.flatten() for k, v in net.state_dict().items()
                              if not k.startswith("wide")]) for net in (one, two)]
        gap = (weights[0] - weights[1]).abs()
        # Adam turns float noise in a near-zero gradient (a dead unit) into a whole step
        assert (gap <= 1e-5).float().mean() > 0.999 and gap.max() < 3e-4, gap.max()
        np.testing.assert_allclose(two.wide.weight.detach().numpy(),
                                   one.wide.weight.detach().numpy(), atol=1e-5)
    users = np.arange(0, data.n_users, 3)
    assert np.array_equal(shared.recommend(users, data.train, 10)[0],
                          alone.recommend(users, data.train, 10)[0])


def _assert_same_graph_training(alone, shared) -> None:
    assert shared.training_log["workers"] == 2
    for one, two in zip(alone.training_log["history"], shared.training_log["history"],
                        strict=True):
        assert abs(one["val_recall@20"] - two["val_recall@20"]) < 1e-4
    np.testing.assert_allclose(shared.item_vectors, alone.item_vectors, atol=1e-4)
    np.testing.assert_allclose(shared.user_vectors, alone.user_vectors, atol=1e-4)
    users = np.arange(0, alone.n_users, 5)
    assert np.array_equal(shared.recommend(users, 10)[0], alone.recommend(users, 10)[0])


def test_graphsage_on_ray_train_equals_one_process(ray_engine, tmp_path):
    """GraphSAGE in mini-batches on Ray Train, each rank taking half of every global BPR
    batch over its own neighbourhoods: with a fanout above every degree (whole
    neighbourhoods, so no sampling noise) the same validation history and vectors as one
    process."""
    from dataHandler import open_dataset
    from model.ddp import graph_train_loop
    from model.graph import GraphSAGE

    data = open_dataset("demo", tmp_path)
    text = (np.random.default_rng(0).normal(size=(data.n_users, 8)).astype(np.float32),
            np.random.default_rng(1).normal(size=(data.n_items, 8)).astype(np.float32))
    settings = {"epochs": 4, "eval_every": 2, "batch": 512, "patience": 3}

    def model() -> GraphSAGE:
        return GraphSAGE(16, 2, 8, settings, seed=0, device="cpu", fanout=1000)
    _assert_same_graph_training(model().fit(data, text),
                                model().fit(data, text, graph_train_loop(ray_engine)))


def test_lightgcn_on_ray_train_equals_one_process_through_the_given_storage(
        ray_engine, tmp_path, monkeypatch):
    """LightGCN on Ray Train (full propagation on every rank, each taking half of every
    global BPR batch): the same validation history and vectors as one process; rank 0's
    result reaches the driver as a checkpoint persisted under the engine's storage (what
    a cluster of several nodes shares), not through a folder of the driver's machine, and
    the run's folder is removed once read."""
    import model.ddp as ddp
    from dataHandler import open_dataset
    from model.graph import LightGCN

    data = open_dataset("demo", tmp_path)
    settings = {"epochs": 4, "eval_every": 2, "batch": 512, "patience": 3}
    storage = tmp_path / "shared-storage"
    engine = type("Engine", (), {"name": "ray", "workers": 2, "storage": str(storage)})()
    persisted, remove = [], ddp._remove_run

    def recorded(result) -> None:
        persisted.extend(Path(result.path).rglob("checkpoint_*/*"))
        remove(result)
    monkeypatch.setattr(ddp, "_remove_run", recorded)

    def model() -> LightGCN:
        return LightGCN(16, 2, settings, seed=0, device="cpu")
    shared = model().fit(data, ddp.graph_train_loop(engine))
    _assert_same_graph_training(model().fit(data), shared)
    assert {path.name for path in persisted} == {"net.pt", "users.npy", "items.npy",
                                                 "fitted.json"}  # no pickle
    assert all(storage in path.parents for path in persisted)
    assert not list(storage.glob("graph_worker-*"))  # removed once read


def test_simgcl_on_ray_train_equals_one_process(ray_engine, tmp_path):
    """SimGCL on Ray Train: each rank takes half of every global BPR batch and computes the
    contrastive term over the whole batch with the same noisy views (same torch seed), so
    the averaged gradients, validation history and vectors are one process's; the
    contrastive term is really on (the model differs from LightGCN's with the same seed)."""
    from dataHandler import open_dataset
    from model.ddp import graph_train_loop
    from model.graph import LightGCN, SimGCL

    data = open_dataset("demo", tmp_path)
    settings = {"epochs": 4, "eval_every": 2, "batch": 512, "patience": 3}

    def model() -> SimGCL:
        return SimGCL(16, 2, settings, seed=0, device="cpu", cl_weight=0.5, cl_nodes=64)
    alone = model().fit(data)
    shared = model().fit(data, graph_train_loop(ray_engine))
    assert shared.training_log["workers"] == 2
    _assert_same_graph_training(alone, shared)
    plain = LightGCN(16, 2, settings, seed=0, device="cpu").fit(data)
    assert np.abs(plain.item_vectors - alone.item_vectors).max() > 1e-3


def test_simgcl_fails_when_ranks_draw_different_noise(monkeypatch):
    """The check behind the equality above: a rank whose contrastive term differs from rank
    0's (different noise) stops the training instead of silently averaging two losses."""
    import model.graph as graph

    monkeypatch.setattr(graph, "data_parallel", lambda: (1, 2))
    monkeypatch.setattr(graph, "mean_over_ranks", lambda value: value / 2)
    monkeypatch.setattr(graph, "rank0_value", lambda value: 0.25)  # rank 0's term
    graph._require_same_on_every_rank(torch.tensor(0.25))
    with pytest.raises(RuntimeError, match="different contrastive terms"):
        graph._require_same_on_every_rank(torch.tensor(0.5))


def test_training_goes_to_ray_train_on_several_nodes_only_with_shared_storage(monkeypatch):
    """Ray Train workers persist their result to the engine's storage: a cluster of several
    nodes without one (`--ray-storage`) trains in the driver instead of failing after the
    training; one node needs none."""
    import ray

    from model.ddp import ray_workers

    def engine(storage):
        return type("Engine", (), {"name": "ray", "workers": 4, "storage": storage})()
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    assert ray_workers(engine(None)) == 4
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    assert ray_workers(engine(None)) == 1
    assert ray_workers(engine("s3://bucket/runs")) == 4
    assert ray_workers(type("Local", (), {"name": "local", "workers": 1})()) == 1
    assert ray_workers(None) == 1


SHIPPED = """
import json, os
from model.engine import RayEngine
engine = RayEngine(workers=1, address="local")  # an address: as when joining a cluster
print(json.dumps(engine.map(os.listdir, [(".",)]) + engine.map(os.getcwd, [()])))
engine.close()
"""


def test_joining_a_cluster_ships_the_project_code_without_ignored_folders():
    """With --ray-address, the workers run in a copy of the project's folder that Ray
    ships to each node (they need not have the code at the driver's path); runs/, .venv/
    and .git/ stay behind."""
    done = subprocess.run([sys.executable, "-c", SHIPPED], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    listing, cwd = json.loads(done.stdout.strip().splitlines()[-1])
    assert cwd != str(ROOT)
    assert {"main.py", "model", "coreMethod.py", "requirements.txt"} <= set(listing)
    assert not {".git", ".venv", "runs"} & set(listing)
