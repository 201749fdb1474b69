"""Defects found by probing (issue 12, items 7, 11, 13, 20, 21, 22): each test fails on the
code before its fix."""
import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dataHandler import Dataset

TOPICS = ["thai", "pizza", "sushi", "tacos"]


class KeywordEncoder:
    """One dimension per topic word, one for anything else: a profile that names a topic
    points at that topic's items; one without a topic word points nowhere useful."""

    dim, device = len(TOPICS) + 1, "cpu"

    def encode(self, texts, show_progress=True, desc="encode"):
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            hits = [k for k, topic in enumerate(TOPICS) if topic in text]
            vectors[row, hits[0] if hits else len(TOPICS)] = 1.0
        return vectors

    def describe(self):
        return {"base": "keywords"}

    def fingerprint(self):
        return "keywords"


def topic_data(user_profile: str) -> Dataset:
    """40 users, 40 items in 4 topics; every user's train/val/test items are in one topic.
    The first 20 users have a written profile, `user_profile` formatted with their topic."""
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 40
    item_topic = np.arange(n_items) % len(TOPICS)
    user_topic = rng.integers(len(TOPICS), size=n_users)
    splits = [np.zeros((n_users, n_items)) for _ in range(3)]
    for user in range(n_users):
        own = rng.permutation(np.flatnonzero(item_topic == user_topic[user]))
        splits[0][user, own[:4]], splits[1][user, own[4]], splits[2][user, own[5]] = 1, 1, 1
    written = np.array(["written"] * 20 + ["none"] * 20)
    user_profiles = [user_profile.format(TOPICS[t]) if s == "written" else None
                     for t, s in zip(user_topic, written)]
    return Dataset("topics", *(sp.csr_matrix(m) for m in splits), user_profiles,
                   [f"{TOPICS[t]} place" for t in item_topic], written,
                   np.array(["written"] * n_items))


@pytest.mark.parametrize("profile, chosen", [("A 24-year-old technician", "item-mean"),
                                             ("Loves {} every week", "profile")])
def test_text_users_are_their_profile_or_item_mean_as_validation_says(profile, chosen):
    from model import TextRecall

    model = TextRecall(KeywordEncoder()).fit(topic_data(profile))
    choice = model.training_log["user_text_choice_on_validation"]["written"]
    assert choice["chosen"] == chosen and choice["users_compared"] == 20
    expected_kind = "written" if chosen == "profile" else "item-mean"
    assert set(model.user_kind[:20]) == {expected_kind}
    fixed = TextRecall(KeywordEncoder(), user_text="written").fit(topic_data(profile))
    assert set(fixed.user_kind[:20]) == {"written"}  # a fixed choice is kept
    only_items = TextRecall(KeywordEncoder(), user_text="item-mean").fit(topic_data(profile))
    assert set(only_items.user_kind) == {"item-mean"}


def test_text_choice_and_bench_recall_ignore_the_test_split():
    from bench import text_recall_at_20

    data = topic_data("Loves {} every week")
    shuffled = dataclasses.replace(data, test=sp.csr_matrix(data.test.toarray()[::-1]))
    assert text_recall_at_20(KeywordEncoder(), data, None) == \
        text_recall_at_20(KeywordEncoder(), shuffled, None)


def test_lightgcn_penalises_layer_zero_embeddings():
    from model import LightGCN

    data = topic_data("x")
    model = LightGCN(dim=8, train={"epochs": 1, "batch": 64}, device="cpu").fit(data)
    loss_fn = model._loss_fn(data.n_users)
    users, positives, negatives = (torch.tensor([0, 1]), torch.tensor([0, 1]),
                                   torch.tensor([2, 3]))
    propagated = [torch.randn(2, 8, generator=torch.Generator().manual_seed(k))
                  for k in range(3)]
    weight = model.net.embedding.weight

    def loss_with_layer0_scaled(scale: float) -> float:
        original = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(scale)
        value = loss_fn(*propagated, users, positives, negatives).item()
        with torch.no_grad():
            weight.copy_(original)
        return value

    penalty = loss_with_layer0_scaled(1.0) - loss_with_layer0_scaled(0.0)
    assert penalty > 0  # the propagated vectors did not change, the penalty did
    assert loss_with_layer0_scaled(2.0) - loss_with_layer0_scaled(0.0) == \
        pytest.approx(4 * penalty, rel=1e-4)


def test_a_model_stopped_at_its_epoch_cap_says_so(capsys):
    from model import LightGCN

    model = LightGCN(dim=8, train={"epochs": 2, "batch": 64, "eval_every": 1, "lr": 0.01},
                     device="cpu").fit(topic_data("x"))
    history = model.training_log["history"]
    errors = capsys.readouterr().err
    assert [h["epoch"] for h in history] == ["1/2", "2/2"]  # epoch of the total
    assert "elapsed, at most" in errors  # a time estimate with every check
    assert model.training_log["stopped_at_epoch_cap"] is True  # 2 epochs: no patience run out
    assert "stopped by the epoch cap (2), not by early stopping" in errors
    patient = LightGCN(dim=8, train={"epochs": 40, "batch": 64, "eval_every": 1,
                                     "patience": 1, "lr": 0.5}, device="cpu").fit(
        topic_data("x"))
    assert len(patient.training_log["history"]) < 40  # early stopping fired
    assert patient.training_log["stopped_at_epoch_cap"] is False


def test_finetuned_text_rows_use_the_zero_shot_numeric_format(tmp_path, tiny_roberta):
    from test_pipeline import common, run_cli

    run_dir = run_cli("--dataset", "demo", "--model", "text", "--finetune", "bitfit",
                      "--ft-steps", "2", "--ft-eval-every", "2", "--ft-batch", "8",
                      "--base-model", str(tiny_roberta), "--layers", "2", *common(tmp_path))
    variants = json.loads((run_dir / "metrics.json").read_text())["variants"]
    formats = {name: variants[name]["encoder"]["runs_int8"] for name in ("text", "text (bitfit)")}
    assert formats == {"text": True, "text (bitfit)": True}


def test_a_finetuned_text_row_exports_and_reproduces_with_items_lacking_text(tmp_path,
                                                                             tiny_roberta):
    from click.testing import CliRunner

    from conftest import CORPUS, write_easyrec, write_json_lines
    from main import cli
    from test_pipeline import run_cli

    rng = np.random.default_rng(0)
    splits = [(rng.random((60, 40)) < p).astype(float) for p in (0.15, 0.05, 0.05)]
    folder = write_easyrec(tmp_path / "partial", *splits)
    write_json_lines(folder / "item_profile.json",  # items 30..39 have no text
                     [{"item_id": i, "profile": CORPUS[i % 6]} for i in range(30)])
    write_json_lines(folder / "user_profile.json",
                     [{"user_id": u, "profile": CORPUS[u % 6]} for u in range(20)])
    run_dir = run_cli("--dataset", str(folder), "--model", "text", "--finetune", "bitfit",
                      "--ft-steps", "2", "--ft-eval-every", "2", "--ft-batch", "8",
                      "--base-model", str(tiny_roberta), "--layers", "2",
                      "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c"))
    tuned = json.loads((run_dir / "metrics.json").read_text())["variants"]["text (bitfit)"]
    assert tuned["items_without_text_excluded"] == 10
    out = tmp_path / "bundle"
    exported = CliRunner().invoke(cli, ["export", "--run", str(run_dir), "--variant",
                                        "text (bitfit)", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    checked = CliRunner().invoke(cli, ["evaluate", "--bundle", str(out)])
    assert checked.exit_code == 0 and "reproduced" in checked.output, checked.output


@pytest.mark.parametrize("flags, message", [
    (["--layers", "0"], "layers must be at least 1"),
    (["--candidates", "0"], "candidates must be at least 1"),
    (["--tune-budget", "-5"], "tune_budget must be at least 0"),
    (["--seeds", "0"], "seeds must be at least 1"),
    (["--dataset", "no/such/folder"], "no/such/folder: no such folder")])
def test_out_of_range_options_are_one_line_errors_before_any_work(tmp_path, flags, message):
    from click.testing import CliRunner

    from main import cli

    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["run", "--model", "popularity", "--data-root",
                                      str(tmp_path / "data"), "--runs-dir", str(runs), *flags])
    assert result.exit_code == 1 and message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not runs.exists()


@pytest.mark.parametrize("model_name", ["text", "tfidf"])
def test_a_user_with_only_a_profile_keeps_it_when_item_mean_wins(model_name):
    from model import TextRecall, TfidfRecall

    data = topic_data("A technician, every place")  # tasteless: item-mean wins on validation
    train = data.train.tolil()
    train[0] = 0  # user 0: a written profile, no training items
    data = dataclasses.replace(data, train=train.tocsr())
    data.user_profiles[0] = "thai place"
    data.user_profiles[1] = "xyzzy plugh"  # no word the items use
    model = TextRecall(KeywordEncoder()) if model_name == "text" else TfidfRecall(min_df=1)
    model.fit(data)
    assert model.training_log["user_text_choice_on_validation"]["written"]["chosen"] == \
        "item-mean"
    assert model.user_kind[0] == "written" and model.user_mask[0]
    assert model.recommend(np.array([0]), 3)[0][0, 0] >= 0
    assert model.user_kind[1] == "item-mean"  # an empty profile never replaces a vector


def test_early_stopping_on_the_last_round_is_still_early_stopping():
    from coreMethod import BestState, train_until_no_improvement

    scores = iter([0.5, 0.4, 0.3])  # 3 rounds; patience 2 runs out on the last one

    def run(rounds: int) -> dict:
        return train_until_no_improvement(lambda r: {}, lambda: next(scores),
                                          BestState(torch.nn.Linear(1, 1)), rounds, patience=2)
    assert run(3)["stopped_early"] is True
    scores = iter([0.3, 0.4, 0.5])
    assert run(3)["stopped_early"] is False  # still improving at the cap


def test_ranked_lists_hold_k_items_when_k_exceeds_the_candidates(tmp_path):
    from dataHandler import open_dataset
    from model import LightGCN, WideDeepRanker

    data = open_dataset("demo", tmp_path)
    recall = LightGCN(dim=8, train={"epochs": 2, "eval_every": 2}, device="cpu").fit(data)
    ranker = WideDeepRanker(candidates=10, channel_candidates=0, epochs=1,
                            device="cpu").fit(data, recall)
    top, _ = ranker.recommend(np.arange(30), data.train, 25)
    assert (top >= 0).all()  # 25 items each, not the 10 candidates
