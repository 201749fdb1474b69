"""The `run` command end to end, as a user runs it."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

from conftest import write_easyrec
from main import cli
from model import Recommender
from model.config import RECALL_VARIANTS, ExperimentConfig


def run_cli(*args: str) -> Path:
    result = CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = [l for l in result.output.splitlines() if l.startswith("run written to ")][-1]
    return Path(line.removeprefix("run written to "))


def common(tmp_path: Path, cache: str = "cache") -> list[str]:
    return ["--data-root", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / cache), "--epochs", "6", "--dw-epochs", "2"]


def test_demo_run_writes_a_complete_run_folder(tmp_path):
    run_dir = run_cli("--dataset", "demo", *common(tmp_path))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    variants = metrics["variants"]
    assert set(variants) == set(RECALL_VARIANTS)
    assert all(v["status"] == "ok" for v in variants.values())
    assert variants["fused"]["parts"] == ["text", "deepwalk", "graphsage", "lightgcn", "simgcl",
                                          "als"]
    # the classic baselines were tuned on validation, and fusion starts from the best part
    assert variants["als"]["settings_tried"] > 10
    assert variants["fused"]["best_val_recall@20"] >= variants["als"]["best_val_recall@20"]
    assert metrics["dataset"]["text_coverage"]["users"]["written"] > 0
    # on the demo data, users' tastes are in the text: text recall must beat popularity
    assert variants["text"]["metrics"]["recall@20"] > variants["popularity"]["metrics"]["recall@20"]
    per_user = pd.read_parquet(run_dir / "per_user" / "text.parquet")
    assert len(per_user) == metrics["dataset"]["test_users"]
    assert np.isclose(per_user["ndcg@20"].mean(), variants["text"]["metrics"]["ndcg@20"], atol=1e-5)
    assert "| text |" in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "config.json").read_text())["data"]["dataset"] == "demo"


def test_two_runs_with_the_same_seed_agree(tmp_path, tiny_roberta):
    encoder = ["--base-model", str(tiny_roberta), "--layers", "2", "--no-quantize"]
    first = run_cli("--dataset", "demo", *encoder, *common(tmp_path, "cache-a"))
    second = run_cli("--dataset", "demo", *encoder, *common(tmp_path, "cache-b"))
    a, b = (json.loads((d / "metrics.json").read_text())["variants"] for d in (first, second))
    assert a["text"]["metrics"] == b["text"]["metrics"]
    assert a["text"]["encoder"]["architecture"] == "roberta"


def test_data_without_profiles_reports_text_as_unavailable(tmp_path):
    rng = np.random.default_rng(0)
    matrices = [(rng.random((30, 20)) < 0.2).astype(float) for _ in range(3)]
    folder = write_easyrec(tmp_path / "noprofiles", *matrices)
    run_dir = run_cli("--dataset", str(folder), *common(tmp_path))
    variants = json.loads((run_dir / "metrics.json").read_text())["variants"]
    assert variants["popularity"]["status"] == "ok"
    assert variants["text"]["status"] == "unavailable"
    assert "no item profiles" in variants["text"]["reason"]
    # without text, GraphSAGE runs on id embeddings and fusion on the graph signals
    assert variants["graphsage"]["status"] == "ok"
    assert variants["fused"]["parts"] == ["deepwalk", "graphsage", "lightgcn", "simgcl", "als"]


def test_bad_data_is_a_clear_cli_error(tmp_path):
    folder = write_easyrec(tmp_path / "bad", np.eye(3), np.eye(3), np.zeros((3, 3)))
    result = CliRunner().invoke(cli, ["run", "--dataset", str(folder), *common(tmp_path)])
    assert result.exit_code != 0
    assert "test split is empty" in result.output
    assert not (tmp_path / "runs").exists()


def test_saved_encoder_keeps_its_pooling(tmp_path, tiny_roberta):
    from model import TextEncoder
    from model.pipeline import build_encoder

    TextEncoder.from_pretrained(str(tiny_roberta), layers=2, pooling="cls").save(tmp_path / "enc")
    config = ExperimentConfig().updated({"device": "cpu", "pooling": "mean", "batch_size": 8,
                                         "quantize": False, "encoder_path": str(tmp_path / "enc")})
    encoder = build_encoder(config)
    assert encoder.pooling == "cls" and encoder.model.config.num_hidden_layers == 2


def test_finetuned_encoder_is_saved_and_reused_with_encoder(tmp_path, tiny_roberta):
    tiny = ["--base-model", str(tiny_roberta), "--layers", "2", "--no-quantize"]
    run_dir = run_cli("--dataset", "demo", "--model", "text", "--finetune", "prefix",
                      "--ft-steps", "4", "--ft-eval-every", "2", "--ft-batch", "8", *tiny,
                      *common(tmp_path))
    tuned = json.loads((run_dir / "metrics.json").read_text())["variants"]["text (prefix)"]
    assert tuned["status"] == "ok" and tuned["trainable_parameters"] == 16 * 2 * 2 * 32
    assert [h["step"] for h in tuned["history"]] == [0, 2, 4]
    assert 0 <= tuned["best_step"] <= 4
    again = run_cli("--dataset", "demo", "--model", "text", "--encoder", tuned["encoder_path"],
                    "--no-quantize", *common(tmp_path, cache="cache2"))
    reused = json.loads((again / "metrics.json").read_text())["variants"]["text"]
    assert reused["metrics"]["ndcg@20"] == tuned["metrics"]["ndcg@20"]


def test_users_are_banded_by_training_interactions():
    import scipy.sparse as sp

    from model.pipeline import activity_bands

    counts = [0, 1, 3, 4, 10, 11]
    train = sp.csr_matrix(np.array([[1] * c + [0] * (12 - c) for c in counts]))
    assert activity_bands(train).tolist() == ["0", "1-3", "1-3", "4-10", "4-10", ">10"]


def test_a_run_releases_each_model_once_no_later_row_reads_it(tmp_path, monkeypatch):
    """Variants are not held to the end of a run: a model is dropped before the first row
    that no longer reads it, and nothing a later row reads is dropped (each is fitted once)."""
    from model.pipeline import Experiment, RecallModels

    fitted = []
    original = RecallModels._once

    def counting(self, name, fit):
        def recorded():
            fitted.append(name)
            return fit()
        return original(self, name, recorded)
    monkeypatch.setattr(RecallModels, "_once", counting)
    config = ExperimentConfig.from_dict({
        "data": {"dataset": "demo", "data_root": str(tmp_path / "data")},
        "run": {"variants": "popularity,ease,als,lightgcn,fused",
                "runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
        "graph": {"fuse_parts": ["als", "lightgcn"], "epochs": 2},
        "rank": {"rank": "widedeep", "rank_on": "fused", "rank_epochs": 1,
                 "rank_item_models": ["itemknn"]}})
    experiment = Experiment(config)
    experiment.run()
    assert sorted(fitted) == sorted(set(fitted))  # nothing dropped that a later row read
    assert set(experiment.models._fitted) == {"fused", "als", "lightgcn", "itemknn"}


def test_simgcl_trains_at_its_own_size(tmp_path):
    run_dir = run_cli("--dataset", "demo", "--model", "lightgcn,simgcl", "--dim", "16",
                      "--simgcl-dim", "24", *common(tmp_path))
    sizes = {}
    for name in ("lightgcn", "simgcl"):
        saved = json.loads((run_dir / "models" / name / "model.json").read_text())
        vectors = Recommender.load(run_dir / "models" / name).embeddings()[0]
        sizes[name] = (saved["params"]["dim"], vectors.shape[1])
    assert sizes == {"lightgcn": (16, 16), "simgcl": (24, 24)}
    # a run's config from before the option (no simgcl_dim) reruns SimGCL at --dim
    assert ExperimentConfig.from_dict({"graph": {"dim": 32}}).graph.simgcl_dim is None
