"""Graph signals: walks follow training edges with the right odds, GraphSAGE is inductive,
fusion vectors have the promised shape and geometry."""
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import binomtest

from coreMethod import bipartite_graph, random_walks, sample_bpr_triples, sample_neighbours
from dataHandler import Dataset
from model.fusion import search_fusion_weights, weighted_concat


def tiny_dataset(train: np.ndarray, val: np.ndarray | None = None) -> Dataset:
    train_csr = sp.csr_matrix(train.astype(np.float32))
    val_csr = sp.csr_matrix(val.astype(np.float32)) if val is not None else train_csr
    users, items = train.shape
    return Dataset("tiny", train_csr, val_csr, val_csr, [None] * users, [None] * items,
                   np.array(["none"] * users, object), np.array(["none"] * items, object))


def test_bipartite_graph_is_symmetric_with_item_offset():
    train = sp.csr_matrix(np.array([[2, 0, 1], [0, 1, 0]], dtype=np.float32))
    graph = bipartite_graph(train)
    assert graph.shape == (5, 5)
    assert graph[0, 2] == 2 and graph[2, 0] == 2 and graph[1, 3] == 1
    assert (graph != graph.T).nnz == 0
    assert graph[:2, :2].nnz == 0 and graph[2:, 2:].nnz == 0


def test_walks_only_follow_training_edges():
    rng = np.random.default_rng(0)
    train = (rng.random((30, 20)) < 0.15).astype(np.float32)
    held_out = (rng.random((30, 20)) < 0.15) & (train == 0)
    graph = bipartite_graph(sp.csr_matrix(train))
    walks = random_walks(graph, walks_per_node=5, walk_length=12, seed=1)
    steps = np.stack([walks[:, :-1].ravel(), walks[:, 1:].ravel()], axis=1)
    assert np.all(np.asarray(graph[steps[:, 0], steps[:, 1]]).ravel() > 0)
    # no step uses a held-out (validation/test) pair
    user_item = steps[steps[:, 0] < 30]
    assert not held_out[user_item[:, 0], user_item[:, 1] - 30].any()
    # isolated nodes start no walks
    degree = np.diff(graph.indptr)
    assert set(walks[:, 0]) == set(np.flatnonzero(degree > 0))


def test_walks_in_blocks_start_from_the_same_nodes_and_follow_edges(tmp_path):
    """DeepWalk's walks come a block at a time (never all in memory): one block is the
    whole set exactly, smaller blocks keep the same starts and only follow edges, and the
    corpus file holds one walk per line as skip-gram reads it."""
    from coreMethod import walk_blocks
    from model.graph import write_walks

    rng = np.random.default_rng(0)
    graph = bipartite_graph(sp.csr_matrix((rng.random((30, 20)) < 0.15).astype(np.float32)))
    whole = random_walks(graph, walks_per_node=5, walk_length=12, seed=1)
    assert np.array_equal(np.vstack(list(walk_blocks(graph, 5, 12, 1, block=len(whole)))),
                          whole)
    blocks = list(walk_blocks(graph, 5, 12, 1, block=7))
    assert len(blocks) == -(-len(whole) // 7)
    blocked = np.vstack(blocks)
    assert np.array_equal(blocked[:, 0], whole[:, 0])
    steps = np.stack([blocked[:, :-1].ravel(), blocked[:, 1:].ravel()], axis=1)
    assert np.all(np.asarray(graph[steps[:, 0], steps[:, 1]]).ravel() > 0)
    assert random_walks(sp.csr_matrix((4, 4)), 5, 12).shape == (0, 12)  # no edges, no walks
    assert write_walks(tmp_path / "walks.txt", iter(blocks)) == len(blocked)
    np.savetxt(tmp_path / "expected.txt", blocked, fmt="%d")
    assert (tmp_path / "walks.txt").read_text() == (tmp_path / "expected.txt").read_text()


def test_walk_steps_follow_edge_weights():
    # user 0 visited item 0 three times and item 1 once
    graph = bipartite_graph(sp.csr_matrix(np.array([[3, 1]], dtype=np.float32)))
    walks = random_walks(graph, walks_per_node=4000, walk_length=2, seed=3)
    from_user = walks[walks[:, 0] == 0, 1]
    to_item0 = int((from_user == 1).sum())  # node 1 is item 0
    assert binomtest(to_item0, len(from_user), 0.75).pvalue > 0.001
    assert abs(to_item0 / len(from_user) - 0.75) < 0.03


def test_bpr_negatives_avoid_training_items_mostly():
    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((50, 40)) < 0.1).astype(np.float32))
    users, positives, negatives = sample_bpr_triples(train, 5000, rng)
    assert np.all(np.asarray(train[users, positives]).ravel() > 0)
    clash = np.asarray(train[users, negatives]).ravel() > 0
    assert clash.mean() < 0.02  # redrawn once: about 0.1 ** 2


def test_graphsage_gives_isolated_nodes_vectors_from_text_alone():
    from model import GraphSAGE

    rng = np.random.default_rng(0)
    train = (rng.random((20, 15)) < 0.3).astype(np.float32)
    train[:, 14] = 0  # item 14 has no training edges (cold start)
    train[19, :] = 0  # neither has user 19
    val = np.zeros_like(train)
    val[np.arange(19), rng.integers(14, size=19)] = 1
    val[train > 0] = 0
    val[0, 13] = 1
    dataset = tiny_dataset(train, val)
    user_text = rng.normal(size=(20, 8)).astype(np.float32)
    item_text = rng.normal(size=(15, 8)).astype(np.float32)
    training = {"epochs": 2, "batch": 64, "lr": 0.01, "weight_decay": 0.0, "eval_every": 1,
                "patience": 5}
    sage = GraphSAGE(dim=16, layers=2, id_dim=4, train=training, seed=0, device="cpu").fit(
        dataset, (user_text, item_text))
    users, items = sage.embeddings()
    assert users.shape == (20, 16) and items.shape == (15, 16)
    assert np.isfinite(items[14]).all() and np.abs(items[14]).sum() > 0
    assert np.allclose(items[14], sage.embed_new(item_text[14:15])[0], atol=1e-5)
    assert np.allclose(users[19], sage.embed_new(user_text[19:20])[0], atol=1e-5)
    # a connected node's vector does depend on its neighbours
    assert not np.allclose(items[0], sage.embed_new(item_text[0:1])[0], atol=1e-3)


def test_weighted_concat_shapes_and_geometry():
    rng = np.random.default_rng(0)
    a_users, a_items = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    b_users, b_items = rng.normal(size=(4, 5)) * 7, rng.normal(size=(6, 5))
    users = weighted_concat([a_users, b_users], [1.0, 0.25])
    items = weighted_concat([a_items, b_items], [1.0, 0.25])
    assert users.shape == (4, 8) and items.shape == (6, 8) and users.dtype == np.float32

    def mean_norm(x):
        return np.linalg.norm(x, axis=1).mean()
    expected = (a_users @ a_items.T) / (mean_norm(a_users) * mean_norm(a_items)) \
        + 0.25 * (b_users @ b_items.T) / (mean_norm(b_users) * mean_norm(b_items))
    assert np.allclose(users @ items.T, expected, atol=1e-5)
    # a global scale keeps the ranking each part gives on its own (norms are information)
    alone = weighted_concat([b_users, a_users], [1.0, 0.0]) @ \
        weighted_concat([b_items, a_items], [1.0, 0.0]).T
    assert np.array_equal(np.argsort(-alone, axis=1), np.argsort(-(b_users @ b_items.T), axis=1))
    zero = weighted_concat([np.zeros((2, 3))], [1.0])
    assert np.array_equal(zero, np.zeros((2, 3)))


def test_fusion_search_is_never_worse_than_the_best_part():
    from evaluation import Evaluator

    rng = np.random.default_rng(2)
    truth = rng.normal(size=(30, 4)), rng.normal(size=(25, 4))
    scores = truth[0] @ truth[1].T
    val = sp.csr_matrix((scores >= np.sort(scores, axis=1)[:, [-3]]).astype(np.float32))
    train = sp.csr_matrix((30, 25), dtype=np.float32)
    noise = rng.normal(size=(30, 4)), rng.normal(size=(25, 4))
    validation = Evaluator(val, train, (20,))
    users, items = [noise[0], truth[0]], [noise[1], truth[1]]

    def score(weights):
        return validation.vector_recall(weighted_concat(users, weights),
                                        weighted_concat(items, weights))
    weights, best = search_fusion_weights(2, score)
    assert weights[1] == 1.0
    assert best >= validation.vector_recall(truth[0], truth[1]) - 1e-9


def test_the_fusion_search_on_validation_rows_only_scores_as_on_every_row():
    """The fusion search builds the validation users' rows only (no all-users matrix):
    with each part scaled by its norm over every user, each score is the full one's."""
    from evaluation import Evaluator
    from model.fusion import mean_row_norms

    rng = np.random.default_rng(3)
    users, items = [rng.normal(size=(50, 4)), rng.normal(size=(50, 6)) * 3], \
        [rng.normal(size=(25, 4)), rng.normal(size=(25, 6))]
    val = sp.csr_matrix((rng.random((50, 25)) < 0.1).astype(np.float32))
    train = sp.csr_matrix((rng.random((50, 25)) < 0.1).astype(np.float32))
    validation = Evaluator(val, train, (20,), users=np.flatnonzero(np.diff(val.indptr))[::2])
    compact, norms = validation.compacted(), mean_row_norms(users)
    rows = [part[validation.users] for part in users]
    for weights in ([1.0, 0.0], [1.0, 0.25], [0.5, 2.0]):
        full = validation.vector_recall(weighted_concat(users, weights),
                                        weighted_concat(items, weights))
        assert compact.vector_recall(weighted_concat(rows, weights, norms),
                                     weighted_concat(items, weights)) == pytest.approx(full)


def test_lightgcn_learns_a_block_structure():
    from evaluation import Evaluator
    from model import LightGCN

    # two user groups, each interacting only with its own half of the items
    rng = np.random.default_rng(1)
    block = np.zeros((40, 20), dtype=np.float32)
    block[:20, :10] = rng.random((20, 10)) < 0.6
    block[20:, 10:] = rng.random((20, 10)) < 0.6
    holdout = block * (rng.random(block.shape) < 0.3)
    dataset = tiny_dataset(block - holdout, holdout)
    training = {"epochs": 20, "batch": 128, "lr": 0.05, "weight_decay": 0.0, "eval_every": 5,
                "patience": 5}
    model = LightGCN(dim=8, layers=2, train=training, seed=0, device="cpu").fit(dataset)
    users, items = model.embeddings()
    in_block = (users[:20] @ items[:10].T).mean() - (users[:20] @ items[10:].T).mean()
    assert in_block > 0
    assert Evaluator(dataset.val, dataset.train, (5,)).vector_recall(users, items, k=5) > 0.6


def test_lightgcn_propagation_gives_pygs_output_and_gradient():
    """The symmetric-adjacency backward (no transposed copy) is PyG's LGConv backward."""
    import torch
    from torch_geometric.nn import LightGCN as PygLightGCN

    from model import LightGCN
    from model.graph import graph_adjacency

    rng = np.random.default_rng(3)
    train = sp.csr_matrix((rng.random((30, 25)) < 0.15).astype(np.float32))
    adjacency = graph_adjacency(train, normalize=True)
    ours = LightGCN(dim=8, layers=3)._network(55)
    pyg = PygLightGCN(55, 8, 3)
    for conv in pyg.convs:
        conv.normalize = False
    pyg.load_state_dict(ours.state_dict())  # no parameters added: saved nets still load
    weights = torch.as_tensor(rng.normal(size=(55, 8)), dtype=torch.float32)
    for net in (ours, pyg):
        (net.get_embedding(adjacency) * weights).sum().backward()
    assert torch.allclose(ours.get_embedding(adjacency), pyg.get_embedding(adjacency), atol=1e-6)
    assert ours.embedding.weight.grad.abs().sum() > 0
    assert torch.allclose(ours.embedding.weight.grad, pyg.embedding.weight.grad, atol=1e-6)


def test_graphsage_reruns_give_identical_vectors():
    """Several CPU threads sum in a thread-dependent order unless torch's deterministic
    kernels are on: same seed, same vectors."""
    from model import GraphSAGE

    rng = np.random.default_rng(3)
    train = (rng.random((3000, 2000)) < 0.01).astype(np.float32)  # big enough to show it
    val = (rng.random((3000, 2000)) < 0.002).astype(np.float32) * (train == 0)
    dataset = tiny_dataset(train, val)
    text = (np.ones((3000, 16), np.float32), np.ones((2000, 16), np.float32))
    training = {"epochs": 2, "batch": 2048, "eval_every": 2, "patience": 5}
    runs = [GraphSAGE(dim=16, id_dim=8, train=training, seed=0, device="cpu").fit(dataset, text)
            for _ in range(2)]
    assert np.array_equal(runs[0].embeddings()[0], runs[1].embeddings()[0])


def test_sampled_neighbourhoods_are_graph_edges_within_the_fanout():
    train = sp.random(60, 40, density=0.15, format="csr", random_state=3)
    graph = bipartite_graph(train)
    seeds = np.array([5, 70, 2])
    nodes, edges = sample_neighbours(graph, seeds, [3, 2], np.random.default_rng(0))
    assert list(nodes[:3]) == [5, 70, 2] and len(set(nodes)) == len(nodes)
    assert all(graph[nodes[a], nodes[b]] > 0 for a, b in edges.T)
    drawers, counts = np.unique(edges[0], return_counts=True)
    assert counts.max() <= 3
    for seed_position in range(3):  # a seed with few neighbours takes them all
        degree = graph.indptr[seeds[seed_position] + 1] - graph.indptr[seeds[seed_position]]
        if degree <= 3:
            assert (edges[0] == seed_position).sum() == degree


def test_graphsage_on_whole_sampled_neighbourhoods_equals_the_full_graph_pass():
    """With a fanout above every degree, a batch's sampled neighbourhoods hold every edge
    its seeds' outputs depend on, so the mini-batch pass gives the full-batch vectors."""
    import torch

    from model.graph import SAGENet, graph_adjacency

    train = sp.random(50, 30, density=0.1, format="csr", random_state=4)
    graph = bipartite_graph(train)
    torch.manual_seed(0)
    net = SAGENet(80, 6, 4, 8, 2).eval()
    features = torch.randn(80, 6)
    with torch.no_grad():
        full = net(features, graph_adjacency(train, normalize=False))
        seeds = np.array([1, 7, 55, 63])
        sampled = net.sampled(features, graph, torch.as_tensor(np.repeat(seeds, 2)), 100,
                              np.random.default_rng(0))  # repeats allowed
    torch.testing.assert_close(sampled, full[np.repeat(seeds, 2)], atol=1e-5, rtol=1e-5)


def test_early_stopping_waits_out_a_warmup_dip():
    import torch

    from coreMethod import BestState, train_until_no_improvement

    def run(warmup: int) -> dict:
        scores = iter([0.5, 0.3, 0.2, 0.6, 0.7, 0.1, 0.1])  # validation dips, then climbs
        return train_until_no_improvement(lambda r: {}, lambda: next(scores),
                                          BestState(torch.nn.Linear(1, 1)), 7, patience=2,
                                          warmup=warmup)
    assert run(0)["best_round"] == 1 and len(run(0)["history"]) == 3  # stopped in the dip
    after_warmup = run(3)
    assert after_warmup["best_round"] == 5 and after_warmup["stopped_early"]
    assert len(after_warmup["history"]) == 7  # patience counts only after round 3
    falling = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    stopped = train_until_no_improvement(lambda r: {}, lambda: next(falling),
                                         BestState(torch.nn.Linear(1, 1)), 5, patience=1,
                                         warmup=2)
    assert len(stopped["history"]) == 3  # rounds 1-2 never count; round 3 is the first miss


def _blocks(seed: int = 1):
    rng = np.random.default_rng(seed)
    block = np.zeros((40, 20), dtype=np.float32)
    block[:20, :10] = rng.random((20, 10)) < 0.6
    block[20:, 10:] = rng.random((20, 10)) < 0.6
    holdout = block * (rng.random(block.shape) < 0.3)
    return tiny_dataset(block - holdout, holdout)


def test_simgcl_views_step_each_layer_by_eps_into_its_orthant():
    import torch

    from model import SimGCL
    from model.graph import graph_adjacency

    dataset = _blocks()
    model = SimGCL(dim=8, layers=1, eps=0.3, device="cpu")
    model.net = model._network(dataset.n_users + dataset.n_items)
    model._adjacency = graph_adjacency(dataset.train, normalize=True)
    with torch.no_grad():
        clean = model.net.get_embedding(model._adjacency)
        step = (model._noisy_view() - clean) / model.net.alpha[1]
        propagated = model._adjacency @ model.net.embedding.weight
    assert torch.allclose(step.norm(dim=1), torch.full((len(step),), 0.3), atol=1e-5)
    moved = propagated != 0
    assert (torch.sign(step[moved]) == torch.sign(propagated[moved])).all()


def test_simgcl_is_lightgcn_plus_its_contrastive_term(tmp_path):
    from evaluation import Evaluator
    from model import LightGCN, Recommender, SimGCL

    dataset = _blocks()
    training = {"epochs": 20, "batch": 128, "lr": 0.05, "weight_decay": 0.0, "eval_every": 5,
                "patience": 5}
    plain = LightGCN(dim=8, layers=2, train=training, seed=0, device="cpu").fit(dataset)
    no_term = SimGCL(dim=8, layers=2, train=training, seed=0, device="cpu",
                     cl_weight=0.0).fit(dataset)
    assert np.array_equal(no_term.embeddings()[0], plain.embeddings()[0])
    model = SimGCL(dim=8, layers=2, train={**training, "eval_every": 20}, seed=0,
                   device="cpu").fit(dataset)  # one check at the end (Recall@20 of 20 items: 1)
    assert not np.allclose(model.embeddings()[0], plain.embeddings()[0])
    assert Evaluator(dataset.val, dataset.train, (5,)).vector_recall(*model.embeddings(),
                                                                     k=5) > 0.6
    model.save(tmp_path / "simgcl")
    again = Recommender.load(tmp_path / "simgcl")
    assert isinstance(again, SimGCL) and again.cl_weight == model.cl_weight == 0.02
    assert (again.recommend([0, 25], 5)[0] == model.recommend([0, 25], 5)[0]).all()


def test_small_data_gets_enough_steps_per_epoch():
    from coreMethod import epoch_batch

    assert epoch_batch(8192, 175_806) == 8192  # yelp: 21 steps of the batch as given
    assert epoch_batch(8192, 12_000) == 1200  # a small set: 10 steps, not 1
    assert epoch_batch(8192, 5) == 64 and epoch_batch(32, 5) == 32  # never below 64 pairs
