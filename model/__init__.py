"""Model components. Recall models honour one interface (`model.base.Recommender`: fit,
embeddings, recommend, similar_items, similar_users, save, load); the ranker exposes fit,
score, save and load.

Names are imported lazily (PEP 562), so importing one submodule never imports the others:
`from model import LightGCN` loads only `model.graph`.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "Recommender": "model.base", "Unavailable": "model.base", "ModelError": "model.base",
    "FaissRetriever": "model.retrieval",
    "Popularity": "model.classic", "ALS": "model.classic", "EASE": "model.classic",
    "RP3beta": "model.classic", "ItemKNN": "model.classic", "TfidfRecall": "model.content",
    "TextEncoder": "model.text", "TextRecall": "model.text", "ENCODER_CONFIG": "model.text",
    "OFFLINE_BASE": "model.text", "shrink_model": "model.text", "choose_layers": "model.text",
    "DeepWalk": "model.graph", "GraphSAGE": "model.graph", "LightGCN": "model.graph",
    "SimGCL": "model.graph",
    "Fusion": "model.fusion",
    "WideDeepRanker": "model.ranking",
    "Bundle": "model.bundle", "export_bundle": "model.bundle",
    "Experiment": "model.pipeline",
    "ExperimentConfig": "model.config", "TrainConfig": "model.config",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
