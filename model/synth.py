"""Synthetic data for scale measurements only (`main.py synth`): never for quality claims.

Users and items have power-law (Zipf-like) activity and popularity and one of TOPICS topics;
a user picks an item of their own topic with probability TOPIC_LOYALTY, else any item, each
in proportion to its popularity, so there is collaborative and text signal to recover.
Every interaction goes to train / val / test with probability 0.8 / 0.1 / 0.1. Items get a
short templated profile naming their topic; a tenth of the users a profile naming theirs.
The folder is in the CSV layout the loaders read, and says in SYNTHETIC.md (and in every
profile) that it is synthetic. Generation is vectorised and seeded: the same arguments give
the same files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from utils import atomic_path

TOPICS = 50
TOPIC_LOYALTY = 0.8
EXPONENT = 1.1  # Zipf exponent of user activity and item popularity
SPLIT = (0.8, 0.1, 0.1)
MAX_ROUNDS = 30
WORDS = ("cozy", "busy", "quiet", "modern", "family", "late-night", "budget", "upscale")


def _power_law(count: int, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** EXPONENT
    return rng.permutation(weights / weights.sum())  # popular ids spread over the range


def synthetic_interactions(users: int, items: int, interactions: int,
                           seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, item) pairs without repeats (`interactions` of them, or fewer when the
    popular pairs are exhausted within MAX_ROUNDS draws), and the topics."""
    rng = np.random.default_rng(seed)
    user_topic, item_topic = rng.integers(TOPICS, size=users), rng.integers(TOPICS, size=items)
    activity, popularity = _power_law(users, rng), _power_law(items, rng)
    by_topic = [np.flatnonzero(item_topic == t) for t in range(TOPICS)]
    cumulative = [np.cumsum(popularity[ids]) / popularity[ids].sum() if len(ids) else None
                  for ids in by_topic]
    wanted, keys = int(interactions), np.empty(0, dtype=np.int64)
    for _ in range(MAX_ROUNDS):  # repeats are dropped; draw again until there are enough
        if len(keys) >= wanted:
            break
        size = max(2 * (wanted - len(keys)), wanted // 20) + 16
        user = rng.choice(users, size=size, p=activity)
        item = rng.choice(items, size=size, p=popularity)
        loyal = rng.random(size) < TOPIC_LOYALTY
        for topic in np.unique(user_topic[user[loyal]]):
            rows = np.flatnonzero(loyal & (user_topic[user] == topic))
            if cumulative[topic] is not None:
                picks = np.searchsorted(cumulative[topic], rng.random(len(rows)), side="right")
                item[rows] = by_topic[topic][np.minimum(picks, len(by_topic[topic]) - 1)]
        keys = np.sort(np.concatenate([keys, user.astype(np.int64) * items + item]))
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    keys = rng.permutation(keys)[:wanted]
    return keys // items, keys % items, user_topic, item_topic


def write_synthetic(folder: Path, users: int, items: int, interactions: int, seed: int,
                    overwrite: bool = False) -> dict:
    """Write the data set to `folder` (atomically) and return its summary."""
    user, item, user_topic, item_topic = synthetic_interactions(users, items, interactions, seed)
    part = np.random.default_rng(seed + 1).choice(3, size=len(user), p=SPLIT)
    with atomic_path(folder, "SYNTHETIC.md", overwrite) as tmp:
        tmp.mkdir(parents=True)
        for index, name in enumerate(("train.csv", "val.csv", "test.csv")):
            rows = part == index
            pd.DataFrame({"user": user[rows], "item": item[rows]}).to_csv(tmp / name, index=False)
        rng = np.random.default_rng(seed + 2)
        adjectives = rng.choice(WORDS, size=items)
        with open(tmp / "item_profile.json", "w", encoding="utf-8") as handle:
            for i in range(items):
                handle.write(json.dumps({"item_id": i, "profile": f"Synthetic item {i}: a "
                                         f"{adjectives[i]} place for topic {item_topic[i]}."})
                             + "\n")
        with open(tmp / "user_profile.json", "w", encoding="utf-8") as handle:
            for u in range(0, users, 10):
                handle.write(json.dumps({"user_id": u, "profile": "Synthetic user who likes "
                                         f"places for topic {user_topic[u]}."}) + "\n")
        summary = {"synthetic": True, "users": users, "items": items, "seed": seed,
                   "interactions": {name: int((part == i).sum())
                                    for i, name in enumerate(("train", "val", "test"))}}
        (tmp / "SYNTHETIC.md").write_text(
            "# Synthetic data (main.py synth): for scale measurements only\n\n"
            f"Power-law activity and popularity (exponent {EXPONENT}), {TOPICS} topics, "
            f"topic loyalty {TOPIC_LOYALTY}. Not real users or businesses; no quality figure "
            f"measured on it says anything about real data.\n\n```json\n"
            f"{json.dumps(summary, indent=1)}\n```\n")
    return summary
