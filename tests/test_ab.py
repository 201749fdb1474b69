"""Offline A/B statistics on synthetic data with known effects, and the report command."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from evaluation import ABError, compare_metric, paired_bootstrap_ci
from main import cli


def test_bootstrap_ci_covers_a_known_effect():
    rng = np.random.default_rng(0)
    a = rng.normal(0.30, 0.10, size=3000)
    b = a + 0.02 + rng.normal(0, 0.05, size=3000)
    low, high = paired_bootstrap_ci(b - a, seed=1)
    assert low < 0.02 < high and low > 0  # the true lift is inside and zero is outside
    result = compare_metric(a, b)
    assert result["wilcoxon_p"] < 1e-6 and result["paired_t_p"] < 1e-6
    assert result["relative_lift"] == pytest.approx(result["lift"] / a.mean())


def test_no_difference_is_not_significant():
    rng = np.random.default_rng(3)
    a = rng.random(2000)
    b = a + rng.normal(0, 0.05, size=2000)  # noise only, no effect
    result = compare_metric(a, b)
    assert result["ci95_low"] < 0 < result["ci95_high"]
    assert result["wilcoxon_p"] > 0.05 and result["paired_t_p"] > 0.05
    identical = compare_metric(a, a.copy())
    assert identical["wilcoxon_p"] == 1.0 and identical["lift"] == 0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    args = ["run", "--dataset", "demo", "--model", "popularity", "--data-root",
            str(root / "data"), "--runs-dir", str(root / "runs")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = [l for l in result.output.splitlines() if l.startswith("run written to ")][-1]
    return root, line.removeprefix("run written to ")


def test_ab_command_writes_a_consistent_report(demo_run):
    root, run = demo_run
    out = root / "report"
    result = CliRunner().invoke(cli, ["ab", "--a", run, "--b", run, "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "ab.json").read_text())
    metrics = json.loads((root / run / "metrics.json").read_text())
    same = report["metrics"]["ndcg@20"]
    assert same["a"] == pytest.approx(metrics["variants"]["popularity"]["metrics"]["ndcg@20"],
                                      abs=1e-6)
    assert same["lift"] == 0 and same["wilcoxon_p"] == 1.0
    assert set(report["by_item_popularity"]) <= {"head", "torso", "tail"}
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html


def test_ab_refuses_runs_on_different_splits(demo_run, tmp_path):
    root, run = demo_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["dataset"]["interactions"]["test"] += 1
    (other / "metrics.json").write_text(json.dumps(metrics))
    result = CliRunner().invoke(cli, ["ab", "--a", run, "--b", str(other),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "different datasets or splits" in result.output
    assert not (tmp_path / "r").exists()
    with pytest.raises(ABError, match="no successful variant 'nope'"):
        from evaluation import load_run_variant
        load_run_variant(other, "nope")


def test_a_run_written_before_parquet_still_compares(demo_run, tmp_path):
    """Per-user metrics are Parquet (exact floats); a run folder from before, with CSV
    files, still loads."""
    import pandas as pd

    from evaluation import load_run_variant

    _, run = demo_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    stored = next((old / "per_user").glob("*.parquet"))
    pd.read_parquet(stored).to_csv(stored.with_suffix(".csv"), index=False,
                                   float_format="%.6g")  # as runs before Parquet wrote it
    stored.unlink()
    new_frame, old_frame = load_run_variant(run, None)[2], load_run_variant(old, None)[2]
    pd.testing.assert_frame_equal(old_frame, new_frame, check_exact=False, rtol=1e-5)


def test_recall_by_item_segment_counts_distinct_test_items():
    import scipy.sparse as sp

    from evaluation import recall_by_item_segment

    test = sp.csr_matrix(np.array([[2.0, 1.0, 0.0]]))  # a repeat visit counts once
    segments = np.array(["head", "head", "tail"], dtype=object)
    top = np.array([[0, 1, 2]])
    out = recall_by_item_segment(top, np.array([0]), test, segments, k=3)
    assert out["head"][0] == 1.0 and np.isnan(out["torso"][0])


def test_ab_refuses_a_resplit_with_the_same_counts(tmp_path):
    from conftest import write_easyrec
    from dataHandler import load_dataset

    rng = np.random.default_rng(0)
    train = (rng.random((20, 10)) < 0.3).astype(float)
    test = np.zeros_like(train)
    test[np.arange(20), rng.integers(10, size=20)] = 1
    first = load_dataset(write_easyrec(tmp_path / "a", train, test, test))
    second = load_dataset(write_easyrec(tmp_path / "b", train, test[::-1], test[::-1]))
    assert first.summary()["interactions"] == second.summary()["interactions"]
    assert first.summary()["split_sha256"] != second.summary()["split_sha256"]
