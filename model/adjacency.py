"""The interaction graph as a torch sparse adjacency, and LightGCN's propagation over it with
a cheaper backward pass."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch_geometric.nn import LGConv

from coreMethod import bipartite_graph


def graph_adjacency(train: sp.csr_matrix, normalize: bool) -> torch.Tensor:
    """The symmetric user+item adjacency as a torch sparse CSR tensor (items offset by the
    number of users). One sparse matrix product per layer is several times faster on CPU
    than edge-list message passing. `normalize`: D^-1/2 A D^-1/2, as LightGCN uses."""
    graph = bipartite_graph((train > 0).astype(np.float32))
    if normalize:
        degree = np.asarray(graph.sum(axis=1)).ravel()
        scale = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
        graph = sp.diags(scale) @ graph @ sp.diags(scale)
    graph = graph.tocsr().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.as_tensor(graph.indptr, dtype=torch.long),
                                       torch.as_tensor(graph.indices, dtype=torch.long),
                                       torch.as_tensor(graph.data), size=graph.shape,
                                       check_invariants=True)


class _SymmetricProduct(torch.autograd.Function):
    """adjacency @ x, whose backward is adjacency @ grad too, for a *symmetric* adjacency.
    torch's own backward of a sparse CSR product transposes the matrix at every call (a
    sort of all its entries): on CPU that costs about five forward products per step."""

    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adjacency @ grad


class SymmetricLGConv(LGConv):
    """PyG's LGConv over an adjacency normalised once (`graph_adjacency(..., normalize=True)`):
    the same output, a backward pass through `_SymmetricProduct`. A sparse CSR tensor without
    edge weights is taken to be symmetric, as `graph_adjacency`'s always is (a bipartite
    graph, D^-1/2 A D^-1/2); a non-symmetric one would get wrong gradients. Any other input
    (an edge index, a SparseTensor, a COO tensor) goes through LGConv itself."""

    def __init__(self) -> None:
        super().__init__(normalize=False)

    def forward(self, x: torch.Tensor, edge_index, edge_weight=None) -> torch.Tensor:
        if isinstance(edge_index, torch.Tensor) and edge_index.layout == torch.sparse_csr \
                and edge_weight is None:
            return _SymmetricProduct.apply(edge_index, x)
        return super().forward(x, edge_index, edge_weight)
