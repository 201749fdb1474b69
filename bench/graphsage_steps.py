"""Time and peak memory of GraphSAGE's BPR steps on a data folder, full batch against
mini-batch over sampled neighbourhoods (`--fanout`): a few steps of triples drawn from the
training pairs over the whole training graph, with random 384-dimensional node features in
place of text (only their size matters here). One mode per process, so the printed peak
resident memory is that mode's.

    .venv/bin/python -m bench.graphsage_steps --dataset /tmp/synth/s10m --fanout 10
    .venv/bin/python -m bench.graphsage_steps --dataset /tmp/synth/s10m --fanout 0
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import scipy.sparse as sp
import torch

from coreMethod import bipartite_graph, bpr_epoch
from dataHandler import open_dataset
from model.graph import SAGENet, graph_adjacency


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--fanout", type=int, default=10, help="0: full batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        data = open_dataset(args.dataset, root)
    n_users, n_nodes = data.n_users, data.n_users + data.n_items
    rng = np.random.default_rng(0)
    features = torch.as_tensor(rng.normal(size=(n_nodes, 384)).astype(np.float32))
    graph = bipartite_graph(data.train)
    loaded = _peak_mb()
    torch.manual_seed(0)
    net = SAGENet(n_nodes, 384, 64, 64, 2)
    adjacency = None if args.fanout else graph_adjacency(data.train, normalize=False)

    def embed():
        out = net(features, adjacency)
        return out[:n_users], out[n_users:]

    def embed_triples(users, positives, negatives):
        seeds = torch.cat([users, positives + n_users, negatives + n_users])
        return net.sampled(features, graph, seeds, args.fanout, rng).split(len(users))

    picks = rng.choice(data.train.nnz, args.steps * args.batch, replace=False)
    coo = data.train.tocoo()
    some_pairs = sp.csr_matrix((np.ones(len(picks), np.float32), (coo.row[picks],
                                                                  coo.col[picks])),
                               shape=data.train.shape)  # the triples come from these
    started = time.perf_counter()
    bpr_epoch(net, embed, torch.optim.Adam(net.parameters(), lr=5e-3), some_pairs, args.batch,
              1e-4, rng, "cpu", "steps", None, embed_triples if args.fanout else None)
    seconds = (time.perf_counter() - started) / args.steps
    mode = f"fanout {args.fanout}" if args.fanout else "full batch"
    print(f"{mode}: {data.n_users:,} users x {data.n_items:,} items, {data.train.nnz:,} "
          f"training pairs; {seconds:.2f} s per step of {args.batch:,} triples; peak "
          f"{_peak_mb() / 1024:.2f} GB (data and features {loaded / 1024:.2f} GB)")


if __name__ == "__main__":
    main()
