"""The test split is read by the final evaluation only: shuffling it changes no choice made
during training (early-stopping epochs, tuned hyperparameters, fusion weights, ranker
weights) and no validation figure."""
import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

FAST = {"epochs": 4, "batch": 2048, "eval_every": 2, "patience": 2}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    from dataHandler import open_dataset

    data = open_dataset("demo", tmp_path_factory.mktemp("data"))
    rng = np.random.default_rng(0)
    shuffled = sp.csr_matrix(data.test.toarray()[rng.permutation(data.n_users)])
    return data, dataclasses.replace(data, test=shuffled)


def _fit_all(data):
    from model import Fusion, LightGCN, WideDeepRanker
    from model.tuning import tuned

    torch.manual_seed(0)
    als = tuned("als", data, {"seed": 0})
    lightgcn = LightGCN(dim=16, train=FAST, device="cpu").fit(data)
    fused = Fusion("concat", dim=16, device="cpu").fit(data, {"lightgcn": lightgcn, "als": als})
    ranker = WideDeepRanker(candidates=30, epochs=2, device="cpu").fit(data, fused)
    return als, lightgcn, fused, ranker


def test_shuffling_the_test_split_changes_nothing_learnt(twins):
    original, shuffled = twins
    assert (original.test != shuffled.test).nnz > 0
    first, second = _fit_all(original), _fit_all(shuffled)
    def learnt(log: dict) -> dict:  # all but wall-clock times
        return {k: v for k, v in log.items() if "seconds" not in k}
    for a, b in zip(first[:3], second[:3]):
        assert learnt(a.training_log) == learnt(b.training_log)  # settings, epochs, val figures
        assert np.array_equal(a.embeddings()[0], b.embeddings()[0])
    assert first[3].training_log == second[3].training_log
    for (name, x), (_, y) in zip(first[3].net.state_dict().items(),
                                 second[3].net.state_dict().items()):
        assert torch.equal(x, y), name
