"""Cold-start protocols, the cold-only evaluation, the fused model's cold-start path and
distillation of the shrunken encoder."""
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from coreMethod import apply_content_map, fit_content_map
from dataHandler import open_dataset
from evaluation import Evaluator
from main import cli
from model.bundle import Bundle
from model.splits import apply_split, cold_evaluator, cold_item_rows, cold_user_rows


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return open_dataset("demo", tmp_path_factory.mktemp("data"))


def _items_of(matrix: sp.csr_matrix) -> set[int]:
    return set(matrix.tocoo().col.tolist())


def test_cold_items_never_reach_training(demo):
    split = apply_split(demo, "cold-items", 0.2, seed=7)
    val_items, test_items = cold_item_rows(split, "val"), cold_item_rows(split, "test")
    cold = set(val_items) | set(test_items)
    assert not set(val_items) & set(test_items)
    assert not cold & _items_of(split.train)
    everything = (demo.train + demo.val + demo.test).tocsc()
    for item in test_items[:10]:  # every pair of a test-cold item is a test pair
        users = everything[:, item].indices
        assert (split.test[users, item].toarray() > 0).all()
        assert split.val[:, item].nnz == 0
    warm = np.setdiff1d(np.arange(demo.n_items), list(cold))
    assert (split.train[:, warm] != demo.train[:, warm]).nnz == 0
    assert (split.test[:, warm] != demo.test[:, warm]).nnz == 0
    # built user profiles quote training items only: never a held-out item's text
    assert (split.user_profile_source != "written").all()
    for user in range(20):
        quoted = split.user_profiles[user] or ""
        assert not any(demo.item_profiles[i].split(".")[0] in quoted for i in test_items
                       if demo.item_profiles[i] and split.train[user].nnz
                       and i not in split.train[user].indices)
    assert apply_split(demo, "cold-items", 0.2, seed=7).split_digest() == split.split_digest()


def test_cold_users_keep_only_their_written_profile(demo):
    split = apply_split(demo, "cold-users", 0.5, seed=3)
    users = cold_user_rows(split)
    assert len(users) and (np.diff(split.train.indptr)[users] == 0).all()
    assert (split.user_profile_source[users] == "written").all()
    assert [split.user_profiles[u] for u in users] == [demo.user_profiles[u] for u in users]
    assert (split.test != demo.test).nnz == 0


def test_ranking_among_held_out_items_counts_their_pairs_only():
    truth = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]))
    exclude = sp.csr_matrix((3, 4))
    evaluator = Evaluator.among_items(truth, exclude, np.array([2, 3]), ks=(1,))
    assert evaluator.users.tolist() == [0, 2]  # user 1's only truth item is not held out
    top = np.array([[2], [3]])
    assert evaluator.metrics(top)["recall@1"] == 1.0  # user 0's warm item 0 is not counted
    assert evaluator.metrics(np.array([[3], [2]]))["recall@1"] == 0.0


def test_recommend_among_returns_only_those_items(demo):
    from model.classic import EASE, ALS

    among = np.array([3, 8, 20, 41, 77])
    for model in (ALS(factors=8, iterations=2).fit(demo), EASE(l2=10).fit(demo)):
        items, _ = model.recommend(np.arange(30), k=10, among=among)
        assert set(items[items >= 0].tolist()) <= set(among.tolist())
        assert ((items >= 0).sum(1) <= 5).all()


def test_content_map_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(500, 16)).astype(np.float32)
    truth = rng.normal(size=(16, 4)).astype(np.float32)
    factors = text @ truth + 0.5
    weights, _ = fit_content_map(text[:400], factors[:400])
    assert np.allclose(apply_content_map(text[400:], weights), factors[400:], atol=0.05)


def test_fused_model_places_cold_items_through_their_text(demo, tiny_roberta):
    from model.classic import ALS
    from model.fusion import Fusion
    from model.text import TextEncoder, TextRecall

    split = apply_split(demo, "cold-items", 0.2, seed=7)
    text = TextRecall(TextEncoder.from_pretrained(str(tiny_roberta), layers=2)).fit(split)
    als = ALS(factors=16, iterations=5).fit(split)
    fused = Fusion(dim=16).fit(split, {"text": text, "als": als})
    cold = cold_item_rows(split, "test")
    assert fused.places_cold_start and set(fused.cold_maps) >= {"als items"}
    _, items = fused.embeddings()
    als_block = slice(text.item_vectors.shape[1], None)
    assert np.abs(items[cold][:, als_block]).sum(1).min() > 0  # predicted, not zero
    no_path = Fusion(dim=16, cold_path=False).fit(split, {"text": text, "als": als})
    evaluator = cold_evaluator(split, Evaluator.on_test(split, (20,)))
    with_path = evaluator.metrics(evaluator.top_of(fused))["recall@20"]
    assert with_path > evaluator.metrics(evaluator.top_of(no_path))["recall@20"]


def test_zero_weight_part_leaves_no_block_and_text_placement_follows(demo, tiny_roberta,
                                                                    monkeypatch):
    from model import fusion
    from model.classic import ALS
    from model.text import TextEncoder, TextRecall

    split = apply_split(demo, "cold-items", 0.2, seed=7)
    text = TextRecall(TextEncoder.from_pretrained(str(tiny_roberta), layers=2)).fit(split)
    small, als = ALS(factors=4, iterations=3).fit(split), ALS(factors=16, iterations=5).fit(split)
    monkeypatch.setattr(fusion, "search_fusion_weights", lambda n, score: ([0.0, 1.0, 0.5], 0.1))
    fused = fusion.Fusion(dim=16).fit(split, {"small": small, "text": text, "als": als})
    text_dim = text.item_vectors.shape[1]
    users, items = fused.embeddings()
    assert users.shape[1] == items.shape[1] == text_dim + 16  # no columns for "small"
    start, end, scale = fused.text_block
    assert (start, end) == (0, text_dim)  # the text block moved to where "small" was
    cold = cold_item_rows(split, "test")
    assert np.allclose(items[cold, start:end], text.item_vectors[cold] * scale, atol=1e-5)
    placed = np.hstack([text.item_vectors[cold], np.ones((len(cold), 1))]) \
        @ fused.text_projections["items"]
    assert np.allclose(placed, items[cold], atol=1e-4)  # a bundle places them the same way
    # scores as with the zero columns: the weighted sum of the parts' (as placed) scores
    expected = sum(w * (u @ i.T) / (fusion.mean_row_norms([u])[0] * fusion.mean_row_norms([i])[0])
                   for w, (u, i) in zip([1.0, 0.5], (fused.part_signals["text"],
                                                     fused.part_signals["als"])))
    assert np.allclose(users @ items.T, expected, atol=1e-4)


def test_cold_items_run_reports_id_models_as_unable_and_exports(tmp_path):
    args = ["--dataset", "demo", "--split", "cold-items", "--data-root", str(tmp_path / "d"),
            "--runs-dir", str(tmp_path / "runs"), "--fuse-parts", "text,als", "--no-quantize"]
    result = CliRunner().invoke(cli, ["run", "--model", "fused", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Cold start (cold-items): 40 held-out test items" in result.output
    als = CliRunner().invoke(cli, ["run", "--model", "als", *args], catch_exceptions=False)
    assert "| als | unavailable: ID-based: no vector for an item" in als.output
    run = [l for l in result.output.splitlines() if l.startswith("run written to ")][-1][15:]
    out = CliRunner().invoke(cli, ["export", "--run", run, "--variant", "fused",
                                   "--out", str(tmp_path / "bundle")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    bundle = Bundle(tmp_path / "bundle")
    split = apply_split(open_dataset("demo", tmp_path / "d"), "cold-items", 0.2, 2023)
    cold = cold_item_rows(split, "test")
    assert set(cold) <= set(bundle.retriever.row_to_item.tolist())
    encoded = bundle.encoder.encode([split.item_profiles[i] for i in cold], show_progress=False)
    # placed as a new item with a profile is placed when served or updated
    assert np.allclose(bundle.items[cold], bundle.place_text(encoded, "items"), atol=1e-4)
    ids = {split.item_ids[i] if split.item_ids else str(i) for i in cold}
    served = {item for user in bundle.user_ids[:100] for item, _ in bundle.recommend(user, 20)}
    assert served & ids
    evaluated = CliRunner().invoke(cli, ["evaluate", "--bundle", str(tmp_path / "bundle")],
                                   catch_exceptions=False)  # the same cold split is redrawn
    assert evaluated.exit_code == 0, evaluated.output
    # an update keeps the cold-start path: a profile-only user and a new item with a profile
    # and no interactions are placed through it
    (tmp_path / "new.csv").write_text(f"user,item\n{bundle.user_ids[0]},{bundle.item_ids[0]}\n")
    (tmp_path / "users.json").write_text('{"user_id": "newbie", "profile": "Thai food lover"}\n')
    updated = CliRunner().invoke(cli, ["update", "--bundle", str(tmp_path / "bundle"),
                                       "--interactions", str(tmp_path / "new.csv"),
                                       "--user-profiles", str(tmp_path / "users.json"),
                                       "--max-drop", "1"], catch_exceptions=False)
    assert updated.exit_code == 0, updated.output
    after = Bundle(tmp_path / "bundle")
    assert after.version == "v0002"
    profile = after.embed_profile("Thai food lover")
    assert np.allclose(after.users[after.user_row("newbie")], profile, atol=1e-4)
    assert np.allclose(profile, bundle.embed_profile("Thai food lover"), atol=1e-5)
