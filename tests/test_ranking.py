"""The ranking stage: leakage-free features, the wide part memorises crosses, reranking."""
import numpy as np
import scipy.sparse as sp
import torch

from coreMethod import ranking_pairs, rerank
from model.ranking import WideDeep
from model.ranking_features import RankingFeatures


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % len(centres)
    return (centres[labels] + 0.01 * rng.normal(size=(n, centres.shape[1]))).astype(np.float32)


def test_features_come_from_training_interactions_only():
    train = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 0]], dtype=np.float32))
    val = sp.csr_matrix(np.array([[0, 0, 1], [1, 0, 1]], dtype=np.float32))
    rng = np.random.default_rng(0)
    signals = {"x": (rng.normal(size=(2, 4)), rng.normal(size=(3, 4)))}
    features = RankingFeatures(train, signals, "x", n_segments=2)
    assert np.allclose(features.activity, np.log1p([2, 1]))
    assert np.allclose(features.popularity, np.log1p([1, 2, 0]))  # item 2 only in validation
    batch = features.build(np.array([1]), np.array([2]), np.array([0]))
    # dense: cosine, inner product, log rank (one channel), then activity and popularity
    assert batch["dense"][0, 3] == np.float32(np.log1p(1)) and batch["dense"][0, 4] == 0
    # ranker positives in 'val' mode are the validation items the recall stage retrieved
    candidates = np.array([[2, 1], [0, 2]])
    users, items, ranks, labels = ranking_pairs(val, np.array([0, 1]), candidates, 1, 0, rng)
    positive = set(zip(users[labels == 1], items[labels == 1]))
    assert positive == {(0, 2), (1, 0), (1, 2)}
    assert not set(zip(users[labels == 0], items[labels == 0])) & positive


def test_wide_part_learns_a_crossed_feature_and_reorders_candidates():
    rng = np.random.default_rng(0)
    eye = np.eye(8, dtype=np.float32)
    users = clustered(40, eye[:4], rng)  # user and item clusters are orthogonal:
    items = clustered(40, eye[4:], rng)  # no dense signal tells the label
    train = sp.csr_matrix((rng.random((40, 40)) < 0.2).astype(np.float32))
    features = RankingFeatures(train, {"x": (users, items)}, "x", n_segments=4)
    pair_users, pair_items = (a.ravel() for a in np.meshgrid(np.arange(40), np.arange(40),
                                                             indexing="ij"))
    label = ((features.user_segment[pair_users] + features.item_segment[pair_items]) % 2 == 0)
    torch.manual_seed(0)
    ranker = WideDeep(features, mode="wide")
    optimiser = torch.optim.Adam(ranker.parameters(), lr=0.1)
    batch = features.build(pair_users, pair_items, np.zeros(len(pair_users), dtype=np.int64))
    for _ in range(100):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            ranker(batch), torch.as_tensor(label, dtype=torch.float32))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    user = 0
    good = [i for i in range(40) if (features.user_segment[user] + features.item_segment[i]) % 2 == 0]
    bad = [i for i in range(40) if i not in good]
    hand_made = np.array([[bad[0], good[0], bad[1], good[1], bad[2], good[2]]])
    reordered = rerank(lambda *pairs: ranker.score(features, *pairs), np.array([user]),
                       hand_made)[0]
    assert set(reordered[:3]) == set(good[:3])  # every positive cross above every negative


def random_network(rng, n_users: int, n_items: int, dim: int):
    """(features, an untrained Wide&Deep) over random vectors of one channel."""
    users, items = rng.normal(size=(n_users, dim)), rng.normal(size=(n_items, dim))
    features = RankingFeatures(sp.csr_matrix(np.ones((n_users, n_items), np.float32)),
                               {"x": (users, items)}, "x", n_segments=2)
    return features, WideDeep(features)


def test_scoring_projects_each_distinct_row_once_with_the_same_values():
    rng = np.random.default_rng(2)
    net = random_network(rng, 6, 9, 16)[1]
    rows = torch.as_tensor(rng.integers(0, 9, 40))  # rows repeat, as a user's pairs do
    gathered_first = net._projected(net.item_projection, net.item_vectors, rows)  # training
    with torch.no_grad():  # scoring: each distinct row projected once, then gathered
        assert torch.allclose(net._projected(net.item_projection, net.item_vectors, rows),
                              gathered_first, atol=1e-6)
        assert torch.allclose(net._projected(net.item_projection, net.item_vectors, rows[:5]),
                              gathered_first[:5], atol=1e-6)


def test_padding_stays_last():
    features, ranker = random_network(np.random.default_rng(1), 3, 5, 4)
    reordered = rerank(lambda *pairs: ranker.score(features, *pairs), np.array([0, 1]),
                       np.array([[3, -1, 1], [-1, 4, 0]]))
    assert reordered[0, -1] == -1 and reordered[1, -1] == -1
    assert sorted(reordered[0, :2]) == [1, 3] and sorted(reordered[1, :2]) == [0, 4]


def test_training_positives_do_not_leak_through_the_recall_rank(tmp_path, monkeypatch):
    """Training items are never recall candidates: their rank would tell the label."""
    import model.ranking as ranking
    from dataHandler import open_dataset
    from model import LightGCN, WideDeepRanker

    data = open_dataset("demo", tmp_path)
    recall = LightGCN(dim=8, train={"epochs": 2, "eval_every": 2}, device="cpu").fit(data)
    ranks_seen, build = [], ranking.RankingFeatures.build

    def spy(self, users, items, ranks):
        ranks_seen.append(np.unique(ranks))
        return build(self, users, items, ranks)
    monkeypatch.setattr(ranking.RankingFeatures, "build", spy)
    WideDeepRanker(positives="train", candidates=20, epochs=1, device="cpu").fit(data, recall)
    assert ranks_seen and all(np.array_equal(r, [0]) for r in ranks_seen)


def test_union_keeps_the_first_lists_order_and_adds_what_others_find():
    from model.candidates import union_of_lists

    first = np.array([[3, 1, -1], [5, 6, 7]])
    second = np.array([[1, 4], [8, 5]])
    assert union_of_lists([first, second]).tolist() == [[3, 1, 4, -1], [5, 6, 7, 8]]


def test_each_channel_ranks_the_union_and_training_items_are_never_candidates():
    from model.candidates import ChannelCandidates, channel_retrievers

    items = np.eye(6, dtype=np.float32)
    a = np.array([[6, 5, 4, 3, 2, 1]], dtype=np.float32)  # channel a: 0 > 1 > 2 > ...
    b = a[:, ::-1].copy()  # channel b: 5 > 4 > 3 > ...
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 1]], dtype=np.float32))
    channels = ChannelCandidates(channel_retrievers({"a": (a, items), "b": (b, items)}),
                                 np.array([0]), seen, depth=4, widths=[2, 1], n_items=6)
    assert channels.candidates.tolist() == [[1, 2, 4]]  # a's top 2, then b's top 1
    ranks = channels.ranks(np.array([0, 0, 0, 0]), np.array([1, 4, 0, -1]))
    assert ranks.tolist() == [[0, 3], [3, 0], [4, 4], [4, 4]]  # absent, seen, padding: depth


def test_ranker_adds_other_channels_candidates(tmp_path):
    from dataHandler import open_dataset
    from model import Fusion, LightGCN, WideDeepRanker
    from model.tuning import tuned

    data = open_dataset("demo", tmp_path)
    als = tuned("als", data, {"seed": 0}, tune=False)
    lightgcn = LightGCN(dim=8, train={"epochs": 2, "eval_every": 2}, device="cpu").fit(data)
    fused = Fusion("concat", dim=8, device="cpu").fit(data, {"lightgcn": lightgcn, "als": als})
    ranker = WideDeepRanker(candidates=10, channel_candidates=5, epochs=1,
                            device="cpu").fit(data, fused)
    assert ranker.training_log["channels"] == ["fused", "lightgcn", "als"]
    users = np.arange(20)
    channels = ranker.channel_candidates_of(users, data.train)
    union = channels.candidates
    assert union.shape[1] > 10 and ((union >= 0).sum(1) >= 10).all()
    assert np.array_equal(union[:, :10], fused.recommend(users, 10)[0])  # recall order first
    als_top = als.recommend(users, 5)[0]
    assert all(set(a) <= set(u) for a, u in zip(als_top, union))
    top, scores = ranker.recommend(users, data.train, 15)
    assert not rows_seen(data.train, users, top).any()
    if ranker.kept_recall_order:  # the recall model's own order, its scores
        assert np.array_equal(top[:, :10], fused.recommend(users, 10)[0])
    else:
        assert (np.diff(scores[:, :10], axis=1) <= 1e-6).all()  # the ranker's, best first
    ranker.kept_recall_order = False  # the network's order, even where recall's was kept
    built_once = list(ranker._candidate_batches(channels, "cpu"))  # the checking users' cache
    cached = ranker._order(channels, [ranker.net], built_once)
    fresh = ranker._order(channels, [ranker.net])
    assert np.array_equal(cached[0], fresh[0]) and np.array_equal(cached[1], fresh[1])


def rows_seen(matrix, users, items):
    from utils import rows_contain
    return rows_contain(matrix, users, items)


def test_a_channel_never_offers_items_or_users_it_has_no_vector_for():
    from model.candidates import ChannelCandidates, channel_retrievers

    items = np.eye(6, dtype=np.float32)
    items[2] = 0  # item 2: no vector in this channel (e.g. no text)
    users = np.array([[6, 5, 4, 3, 2, 1], [0, 0, 0, 0, 0, 0]], dtype=np.float32)
    channels = ChannelCandidates(channel_retrievers({"text": (users, items)}), np.array([0, 1]),
                                 None, depth=6, widths=[6], n_items=6)
    assert channels.candidates[0].tolist() == [0, 1, 3, 4, 5]  # the union is trimmed
    assert (channels.candidates[1] == -1).all()  # user 1 cannot be scored here


def test_an_item_item_channel_offers_the_models_own_top_items(tmp_path):
    """An item-item model as a channel: its list is the model's own top items (history x
    weights, the user's training items left out; items with no path from the history
    never offered, so a user without history offers none), block by block as at once."""
    from model.candidates import ChannelCandidates, ItemItemChannel, channel_retrievers

    history = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                                      [0, 1, 0, 0, 0, 1]], dtype=np.float32))
    weights = sp.csr_matrix(np.array([[0, 3, 1, 0, 0, 0], [5, 0, 0, 2, 0, 4],
                                      [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                                      [0, 0, 0, 0, 0, 0], [0, 0, 0, 6, 1, 0]],
                                     dtype=np.float32))
    users = np.arange(3)
    channel = ItemItemChannel(history, weights)
    top = channel.top(users, 4, history)
    # user 0: item 1 (3) > item 2 (1); user 2: item 3 (2 + 6) > item 0 (5) > item 4 (1)
    assert top.tolist() == [[1, 2, -1, -1], [-1, -1, -1, -1], [3, 0, 4, -1]]
    assert np.array_equal(ItemItemChannel(history, weights, block_floats=1).top(users, 4,
                                                                                history), top)
    user_vectors = np.tile(np.array([2, 0, 9, 3, 4, 0], dtype=np.float32), (3, 1))
    vectors = {"a": (user_vectors, np.eye(6, dtype=np.float32))}  # user 2: 2 > 4 > 3 > 0
    channels = ChannelCandidates({**channel_retrievers(vectors), "ease": channel}, users,
                                 history, depth=4, widths=[1, 2], n_items=6)
    assert channels.candidates[2].tolist() == [2, 3, 0]  # a's top 1, then the model's top 2
    assert channels.ranks(np.array([2, 2]), np.array([3, 2])).tolist() == [[2, 0], [0, 4]]


def test_item_item_feature_is_the_models_own_score(tmp_path):
    """A pair's item-item feature is what the score-only model itself gives the pair."""
    from dataHandler import open_dataset
    from model.candidates import pair_sums
    from model.tuning import tuned

    data = open_dataset("demo", tmp_path)
    rp3 = tuned("rp3beta", data, {}, tune=False)
    weights = rp3.sparse_weights()
    rng = np.random.default_rng(0)
    users, items = rng.integers(data.n_users, size=500), rng.integers(data.n_items, size=500)
    history = sp.csr_matrix(data.train > 0, dtype=np.float32)
    got = pair_sums(history, weights, users, items)
    assert np.allclose(pair_sums(history, weights, users, items, block_floats=1), got)
    assert np.allclose(got, rp3.score(users)[np.arange(500), items], atol=1e-6)
    assert (got > 0).mean() > 0.1  # not a vacuous match of zeros
    assert not pair_sums(history, weights, users[:3], np.array([-1, -1, data.n_items])).any()
    signals = {"x": (rng.normal(size=(data.n_users, 4)), rng.normal(size=(data.n_items, 4)))}
    features = RankingFeatures(data.train, signals, "x", n_segments=2,
                               item_item={"rp3beta": weights})
    dense = features.build(users, items, np.zeros(500, dtype=np.int64))["dense"].numpy()
    assert dense.shape[1] == features.n_dense == 3 + 2 + 2
    assert np.allclose(dense[:, 5], got) and np.allclose(dense[:, 6], np.log1p(got))
    features.item_item_channels = True  # a rank column for the model's own channel too
    ranks = np.stack([np.zeros(500), np.full(500, 7)], axis=1).astype(np.int64)
    dense = features.build(users, items, ranks)["dense"].numpy()
    assert dense.shape[1] == features.n_dense == 3 + 1 + 2 + 2
    assert np.allclose(dense[:, 3], np.log1p(7)) and np.allclose(dense[:, 6], got)
    ease = tuned("ease", data, {}, tune=False)
    kept = ease.sparse_weights(k=7)  # a dense model keeps each item's 7 largest weights
    assert np.diff(kept.indptr).max() <= 7
    row = ease.weights[3].copy()
    row[3] = 0
    assert np.isclose(kept[3].toarray().max(), row.max())


def test_softmax_loss_on_a_hand_checked_example():
    from coreMethod import grouped_softmax_loss

    logits = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    # user 0: positives 1.0 and 2.0 against negatives {0, 0}; user 1: 5.0 against {0.5}
    expected = (-np.log(np.e / (np.e + 2)) - np.log(np.e ** 2 / (np.e ** 2 + 2))
                - np.log(np.e ** 5 / (np.e ** 5 + np.e ** 0.5)))
    assert np.isclose(grouped_softmax_loss(logits, labels, groups).item(), expected, atol=1e-5)
    alone = grouped_softmax_loss(torch.tensor([3.0], requires_grad=True), torch.tensor([1.0]),
                                 torch.tensor([0]))
    alone.backward()  # a user without negatives adds nothing and no NaN
    assert alone.item() == 0


def test_batches_hold_whole_users():
    from coreMethod import user_batches

    users = np.sort(np.random.default_rng(0).integers(0, 50, size=400))
    batches = user_batches(users, 64, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(400))
    for rows in batches:
        for user in np.unique(users[rows]):
            assert (users[rows] == user).sum() == (users == user).sum()
    assert max(len(rows) for rows in batches) < 64 + np.bincount(users).max()


def test_training_pairs_drawn_in_blocks_of_users_keep_every_positive_and_its_ranks(
        tmp_path, monkeypatch):
    """The ranker draws its training pairs a block of users at a time (never every user's
    candidates at once): the positives and their channel ranks do not depend on the block
    size, and negatives are never positives."""
    from dataHandler import open_dataset
    from model import ranking
    from model.tuning import tuned

    data = open_dataset("demo", tmp_path)
    als = tuned("als", data, {"seed": 0}, tune=False)
    ranker = ranking.WideDeepRanker(candidates=10, epochs=1, device="cpu").fit(data, als)
    users = np.flatnonzero(np.diff(data.val.indptr) > 0)

    def pairs(block: int) -> tuple:
        monkeypatch.setattr(ranking, "PAIR_USERS", block)
        return ranker._training_pairs(data.val, users, data.train, np.random.default_rng(0))

    whole, blocked = pairs(10 ** 6), pairs(7)
    for drawn in (whole, blocked):
        u, i, r, label = drawn
        assert (data.val[u[label == 0], i[label == 0]] == 0).all()
    positive = [{(u, i, tuple(r)) for u, i, r in zip(*(column[drawn[3] == 1]
                                                       for column in drawn[:3]))}
                for drawn in (whole, blocked)]  # ranks: one per channel
    assert positive[0] == positive[1] and len(positive[0]) > 0
    assert abs(len(whole[0]) - len(blocked[0])) < 0.1 * len(whole[0])


def test_item_item_channels_join_the_union_and_a_ranker_saved_before_loads_without(tmp_path):
    """With item-item models as channels, their top lists join the union and the union's
    size counts them; asking for the whole union scores every candidate as a top-20
    request does (the recall list is not widened); a format-3 ranker (before channels)
    loads with them off."""
    import json

    from dataHandler import open_dataset
    from model import WideDeepRanker
    from model.tuning import tuned

    data = open_dataset("demo", tmp_path)
    als = tuned("als", data, {"seed": 0}, tune=False)
    rp3 = tuned("rp3beta", data, {}, tune=False)
    ranker = WideDeepRanker(candidates=10, channel_candidates=5, epochs=1, members=1,
                            device="cpu").fit(data, als,
                                              item_item={"rp3beta": rp3.sparse_weights()})
    assert ranker.training_log["channels"] == ["als", "rp3beta"]
    assert ranker.union_size == 10 + 5
    users = np.arange(30)
    union = ranker.channel_candidates_of(users, data.train).candidates
    rp3_top = rp3.recommend(users, 5)[0]
    assert all(set(r[r >= 0]) <= set(u) for r, u in zip(rp3_top, union))
    whole, whole_scores = ranker.recommend(users, data.train, ranker.union_size)
    top, scores = ranker.recommend(users, data.train, 10)
    assert np.array_equal(whole[:, :10], top) and np.allclose(whole_scores[:, :10], scores)
    before = WideDeepRanker(candidates=10, channel_candidates=5, epochs=1, members=1,
                            device="cpu", item_item_channels=False).fit(
        data, als, item_item={"rp3beta": rp3.sparse_weights()})
    folder = before.save(tmp_path / "ranker")
    description = json.loads((folder / "ranker.json").read_text())
    description["format_version"] = 3
    del description["item_item_channels"], description["params"]["item_item_channels"]
    (folder / "ranker.json").write_text(json.dumps(description))
    loaded = WideDeepRanker.load(folder, device="cpu")
    assert not loaded.item_item_channels and loaded.union_size == 10
    assert np.array_equal(loaded.recommend(users, data.train, 10)[0],
                          before.recommend(users, data.train, 10)[0])
