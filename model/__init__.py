"""Model components. Recall models expose `fit(dataset)` and `embeddings()`; the ranker
exposes `fit(...)` and `score(...)`."""
from model.graph import (DeepWalk, Fusion, GraphSAGE, LightGCNRecall,
                         ProjectionFusion, SAGENet, graph_adjacency)
from model.retrieval import FaissRetriever, Popularity
from model.text import (ENCODER_CONFIG, OFFLINE_BASE, TextEncoder, TextRecall,
                        choose_layers, encode_cached, pool, resolve_base_model, shrink_model)

__all__ = ["DeepWalk", "Fusion", "GraphSAGE", "LightGCNRecall", "ProjectionFusion", "SAGENet",
           "graph_adjacency", "FaissRetriever", "Popularity", "ENCODER_CONFIG", "OFFLINE_BASE",
           "TextEncoder", "TextRecall", "choose_layers", "encode_cached", "pool",
           "resolve_base_model", "shrink_model"]
