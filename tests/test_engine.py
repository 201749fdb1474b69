"""The Ray engine gives the local engine's results: encoding, retrieval, per-user metrics and
a whole run; data-parallel ranker training (torchrun and Ray Train, 2 gloo workers) equals
one process at the same global batch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
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


