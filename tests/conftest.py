"""Shared fixtures: tiny real-shaped data folders and a tiny RoBERTa built offline."""
from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "This user enjoys Thai food and cozy cafes in Tucson.",
    "Fans of basketball and sports bars would enjoy this place in Philadelphia.",
    "A quiet bakery with fresh bread, pastries and good coffee.",
    "Spicy Sichuan dishes, hot pot and late-night dining downtown.",
    "Swimming pool, gym classes and a friendly fitness staff.",
    "Vegan bowls, smoothies and outdoor seating near the campus.",
]


def write_json_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_easyrec(folder: Path, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, dense in (("trn_mat.pkl", train), ("val_mat.pkl", val), ("tst_mat.pkl", test)):
        with open(folder / name, "wb") as handle:
            pickle.dump(sp.csr_matrix(dense), handle)
    return folder


@pytest.fixture
def easyrec_folder(tmp_path: Path) -> Path:
    """4 users x 5 items with counts, profiles for some users/items, RLMRec id mappers."""
    train = np.array([[2, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 0, 0]])
    val = np.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    test = np.array([[0, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 1, 0, 0]])
    folder = write_easyrec(tmp_path / "tiny", train, val, test)
    write_json_lines(folder / "item_profile.json", [
        {"item_id": 0, "profile": "Thai restaurant in Tucson. Great curry."},
        {"item_id": 1, "profile": "Coffee shop with pastries."},
        {"item_id": 2, "profile": "VALIDATION-ONLY bakery."},
        {"item_id": 4, "profile": "Sports bar with big screens."},
    ])
    write_json_lines(folder / "user_profile.json", [{"user_id": 1, "profile": "Likes coffee."}])
    write_json_lines(folder / "user_mapper.json",
                     [{"uid": u, "user_id": f"U{u}"} for u in range(4)])
    write_json_lines(folder / "item_mapper.json",
                     [{"iid": i, "business_id": f"B{i}"} for i in range(5)])
    return folder


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 4-layer RoBERTa with a byte-level BPE tokenizer trained on the fly: no download."""
    from transformers import AutoTokenizer

    from model.text import build_tiny_roberta

    folder = build_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"), CORPUS)
    assert len(AutoTokenizer.from_pretrained(folder)("likes thai curry")["input_ids"]) > 4
    return folder
