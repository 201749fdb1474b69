"""Recall bundles: export round trip, integrity checks, queries, storage formats."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from main import cli
from model.bundle import Bundle, BundleError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_roberta):
    root = tmp_path_factory.mktemp("bundle")
    args = ["run", "--dataset", "demo", "--model", "all", "--base-model", str(tiny_roberta),
            "--layers", "2", "--no-quantize", "--epochs", "2", "--dw-epochs", "1",
            "--data-root", str(root / "data"), "--runs-dir", str(root / "runs"),
            "--cache-dir", str(root / "cache")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = [l for l in result.output.splitlines() if l.startswith("run written to ")][-1][15:]
    for variant in ("fused", "lightgcn", "text"):
        out = CliRunner().invoke(cli, ["export", "--run", run, "--variant", variant,
                                       "--out", str(root / variant)], catch_exceptions=False)
        assert out.exit_code == 0, out.output
    return root, run


def test_bundle_reproduces_the_runs_metrics(exported):
    root, run = exported
    result = CliRunner().invoke(cli, ["evaluate", "--bundle", str(root / "fused")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / run / "metrics.json").read_text())["variants"]["fused"]
    row = [l for l in result.output.splitlines() if l.startswith("| recall@20 |")][0]
    now, then = (float(x) for x in row.strip("|").split("|")[1:3])
    assert now == pytest.approx(metrics["metrics"]["recall@20"], abs=1e-4) and now == then


def test_queries_answer_from_the_bundle_alone(exported):
    root, _ = exported
    bundle = Bundle(root / "fused")
    seen = set(bundle.seen[3].indices.tolist())
    top = bundle.recommend("3", k=10)
    assert len(top) == 10 and not seen & {int(i) for i, _ in top}
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    assert "7" not in [i for i, _ in bundle.similar_items("7", k=5)]
    assert "3" not in [u for u, _ in bundle.lookalike_users("3", k=5)]
    with pytest.raises(BundleError, match="unknown user id 'nobody'"):
        bundle.recommend("nobody")
    with pytest.raises(BundleError, match="cannot embed a new profile: variant 'lightgcn'"):
        Bundle(root / "lightgcn").embed_profile("anything")


def test_cold_start_profile_uses_the_runs_encoder(exported, tiny_roberta):
    from model import TextEncoder

    root, _ = exported
    bundle = Bundle(root / "text")
    assert (root / "text" / "current" / "encoder" / "config.json").exists()  # a local base: weights kept
    vector = bundle.embed_profile("This user enjoys Thai places in Tucson.")
    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, quantize=False)
    assert np.allclose(vector, encoder.encode(["This user enjoys Thai places in Tucson."],
                                              show_progress=False)[0], atol=1e-6)
    cold = bundle.recommend_for_vector(vector, 5)
    scores = np.sort(bundle.items @ vector)[::-1][:5]  # ties may come in any order
    assert np.allclose([s for _, s in cold], scores, atol=1e-5)
    shown = CliRunner().invoke(cli, ["recommend", "--bundle", str(root / "text"), "--profile",
                                     "This user enjoys Thai places in Tucson.", "-k", "5"])
    header, first = shown.output.strip().splitlines()[-6:-4]
    assert header == "rank\titem\tscore\tprofile"
    item = first.split("\t")[1]
    assert first.split("\t")[3][:40] == bundle.item_profile(item)[:40] != ""


def test_corrupted_or_incomplete_bundles_are_refused(exported, tmp_path):
    root, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(root / "fused" / "current", broken)  # one version
    vectors = np.load(broken / "item_embeddings.npy")
    vectors[0, 0] += 1.0
    np.save(broken / "item_embeddings.npy", vectors)
    with pytest.raises(BundleError, match="item_embeddings.npy: checksum mismatch"):
        Bundle(broken)
    (broken / "item_embeddings.npy").unlink()
    with pytest.raises(BundleError, match="listed in the manifest but missing"):
        Bundle(broken)
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle(tmp_path)
    result = CliRunner().invoke(cli, ["recommend", "--bundle", str(broken), "--user", "1"])
    assert result.exit_code != 0 and "missing" in result.output


def test_int8_storage_keeps_the_ranking_close(exported, tmp_path):
    root, run = exported
    out = tmp_path / "int8"
    result = CliRunner().invoke(cli, ["export", "--run", run, "--variant", "fused", "--out",
                                      str(out), "--format", "int8"], catch_exceptions=False)
    assert result.exit_code == 0
    exact, small = Bundle(root / "fused"), Bundle(out)
    assert np.load(out / "current" / "item_embeddings.npy").dtype == np.int8
    assert np.abs(exact.items - small.items).max() < 0.02 * np.abs(exact.items).max()
    overlap = [len({i for i, _ in exact.recommend(u, 20)} & {i for i, _ in small.recommend(u, 20)})
               for u in ("1", "2", "3", "4")]
    assert np.mean(overlap) >= 16
    checked = CliRunner().invoke(cli, ["evaluate", "--bundle", str(out)])  # its own figures
    assert checked.exit_code == 0 and "verdict: reproduced" in checked.output, checked.output
    index = json.loads((out / "current" / "manifest.json").read_text())["index"]
    assert index["metrics_exact_search"] == json.loads(  # the run's float32 figures, beside
        (root / run / "metrics.json").read_text())["variants"]["fused"]["metrics"]


def test_recent_items_pull_a_users_list_toward_their_neighbours(exported):
    root, _ = exported
    bundle = Bundle(root / "lightgcn")
    counts = np.diff(bundle.seen.indptr).astype(float)
    counts[counts == 0] = np.inf
    user = bundle.user_ids[int(np.argmin(counts))]  # the lightest user with a history
    seen = {bundle.item_ids[i] for i in bundle.seen[bundle.user_row(user)].indices}
    recent = [i for i in bundle.item_ids if i not in seen][:3]
    neighbours = {i for item in recent for i, _ in bundle.similar_items(item, 10)}
    before = {i for i, _ in bundle.recommend(user, 20)}
    after = [i for i, _ in bundle.recommend_with_recent(user, recent, 20)]
    assert not set(after) & (set(recent) | seen)  # seen and just-seen items are excluded
    assert len(set(after) & neighbours) > len(before & neighbours)
    shown = CliRunner().invoke(cli, ["recommend", "--bundle", str(root / "lightgcn"),
                                     "--user", user, "--recent-items", ",".join(recent),
                                     "-k", "20"], catch_exceptions=False)
    assert [line.split("\t")[1] for line in shown.output.splitlines()[1:]] == after
