"""Versioned bundle stores and the daily update: new items become retrievable, a failed update
leaves `current` alone, rollback restores the parent exactly, the no-regression check holds
an update back, and the service follows `current`."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dataHandler import DataError
from main import cli
from model import update as update_module
from model.bundle import Bundle
from model.update import update_bundle
from model.versions import BundleStore


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def als_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("versions")
    output = _cli("run", "--dataset", "demo", "--model", "als", "--data-root", root / "data",
                  "--runs-dir", root / "runs")
    return Path([l for l in output.splitlines() if l.startswith("run written to ")][-1][15:])


@pytest.fixture
def store(als_run, tmp_path) -> Path:
    _cli("export", "--run", als_run, "--variant", "als", "--out", tmp_path / "bundle")
    return tmp_path / "bundle"


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in rows))
    return path


def test_an_item_added_by_update_is_recommended_and_a_new_user_served(store, tmp_path):
    rows = [(str(u), "NEW-ITEM") for u in range(0, 60, 2)]
    rows += [("new-user", str(i)) for i in (3, 17, 42, 108)]
    output = _cli("update", "--bundle", store, "--interactions", _write_csv(tmp_path / "a.csv",
                                                                             rows))
    assert "version v0002 written; now current" in output
    bundle = Bundle(store)
    assert bundle.version == "v0002" and bundle.manifest["parent"] == "v0001"
    report = bundle.manifest["changes"]
    assert (report["new_items"], report["new_users"], report["new_interactions"]) == (1, 1, 34)
    assert report["fold_in"]["method"] == "als"  # it reproduces ALS's own users best
    new_row = bundle.item_row("NEW-ITEM")
    assert new_row in bundle.retriever.row_to_item
    top = bundle.retriever.search(bundle.users, 20, bundle.seen)[0]
    assert (top == new_row).any(axis=1).sum() > 0  # someone is recommended the new item
    assert "NEW-ITEM" not in [i for i, _ in bundle.recommend("0", 50)]  # seen now: excluded
    fresh = bundle.recommend("new-user", 10)
    assert len(fresh) == 10 and not {"3", "17", "42", "108"} & {i for i, _ in fresh}
    refused = CliRunner().invoke(cli, ["evaluate", "--bundle", str(store)])
    assert refused.exit_code != 0 and "evaluate the version of a full export" in refused.output


def _als_objective(bundle: Bundle) -> float:
    """implicit ALS's loss on the bundle's interactions: confidence alpha on observed pairs
    and 1 elsewhere, plus the L2 penalty."""
    params = bundle.manifest["model_params"]
    users, items = bundle.users.astype(np.float64), bundle.items.astype(np.float64)
    observed = (bundle.seen > 0).toarray().astype(np.float64)
    confidence = 1 + (params["alpha"] - 1) * observed
    return float((confidence * (observed - users @ items.T) ** 2).sum()
                 + params["regularization"] * ((users ** 2).sum() + (items ** 2).sum()))


def test_an_als_update_solves_every_row_again(store, tmp_path, monkeypatch):
    """An ALS bundle's update ends with a warm-started ALS iteration over all users and items:
    users the day did not touch move too, and the ALS objective on the updated data ends
    lower than when only the touched rows are solved again (the drift behind a widening gap
    to the full retrain)."""
    parent = Bundle(store)
    day = _write_csv(tmp_path / "day.csv", [(str(u), str(i)) for u in range(0, 40, 3)
                                            for i in (5, 50, 90)] + [("new", "7"), ("new", "8")])
    monkeypatch.setattr(update_module, "ALS_SWEEPS", 0)  # touched rows only
    update_bundle(store, day)
    touched_only = Bundle(store)
    _cli("versions", "--bundle", store, "--rollback")
    monkeypatch.setattr(update_module, "ALS_SWEEPS", 1)
    update_bundle(store, day)
    swept = Bundle(store)
    assert swept.version == "v0003" and touched_only.version == "v0002"
    sweeps = [s for s in swept.manifest["changes"]["steps"] if s["step"] == "ALS sweep"]
    iterations = parent.manifest["model_params"]["iterations"]
    assert len(sweeps) == 1 and sweeps[0]["cg_steps"] == update_module.sweep_cg_steps(
        iterations, 3)  # fewer CG steps than a refit's when its iterations are few
    quiet = parent.user_row("1")  # no interactions that day
    assert np.array_equal(touched_only.users[quiet], parent.users[quiet])
    assert not np.allclose(swept.users[quiet], parent.users[quiet])
    assert _als_objective(swept) < _als_objective(touched_only)


def test_a_lightgcn_update_warm_starts_from_the_bundles_layer0(tmp_path):
    """A LightGCN bundle keeps its layer-0 embeddings; an update grows them by the new rows
    (their neighbours' mean), trains briefly on the new pairs plus a replay sample, and
    serves the propagation of the result over the updated graph, new item included."""
    import torch

    from model.graph import LightGCN, graph_adjacency

    output = _cli("run", "--dataset", "demo", "--model", "lightgcn", "--epochs", "4",
                  "--data-root", tmp_path / "data", "--runs-dir", tmp_path / "runs")
    run_dir = [line for line in output.splitlines() if line.startswith("run written to ")][-1]
    _cli("export", "--run", run_dir[15:], "--variant", "lightgcn", "--out", tmp_path / "b")
    parent = Bundle(tmp_path / "b")
    layer0 = np.load(parent.folder / parent.manifest["graph"]["file"])
    assert layer0.shape == (len(parent.users) + len(parent.items), parent.manifest["dim"])
    rows = [(str(u), "NEW-ITEM") for u in range(0, 60, 2)] + [("new-user", "3"),
                                                               ("new-user", "NEW-ITEM")]
    _cli("update", "--bundle", tmp_path / "b", "--interactions", _write_csv(tmp_path / "d.csv",
                                                                           rows))
    bundle = Bundle(tmp_path / "b")
    steps = {s["step"]: s for s in bundle.manifest["changes"]["steps"]}
    assert steps["LightGCN warm start"]["new_pairs"] == 32
    assert steps["LightGCN warm start"]["replayed_pairs"] == 4 * 32
    grown = np.load(bundle.folder / bundle.manifest["graph"]["file"])
    assert grown.shape == (len(parent.users) + 1 + len(parent.items) + 1, layer0.shape[1])
    model = LightGCN.from_layer0(grown, bundle.manifest["graph"])  # this version's own state
    with torch.no_grad():
        propagated = model.net.get_embedding(graph_adjacency(bundle.seen, True)).numpy()
    assert np.allclose(propagated, np.vstack([bundle.users, bundle.items]), atol=1e-5)
    assert bundle.item_row("NEW-ITEM") in bundle.retriever.row_to_item
    top = bundle.retriever.search(bundle.users, 20, bundle.seen)[0]
    assert (top == bundle.item_row("NEW-ITEM")).any()  # recommended to someone


def test_a_graphsage_update_runs_the_trained_network_over_the_grown_graph(tmp_path,
                                                                         monkeypatch):
    """A GraphSAGE bundle keeps its network and its nodes' text features; an update runs the
    network over the updated graph: a new item enters with its profile's encoded text and
    no id embedding, and a user with only a profile gets what the network makes of the text
    alone (the service's cold-start answer too). Then the network trains a little more."""
    import torch

    from model import graph_update
    from model.graph import GraphSAGE, graph_adjacency
    from model.graph_update import sage_cold_start, sage_cold_start_network

    output = _cli("run", "--dataset", "demo", "--model", "graphsage", "--epochs", "4",
                  "--data-root", tmp_path / "data", "--runs-dir", tmp_path / "runs")
    run_dir = [line for line in output.splitlines() if line.startswith("run written to ")][-1]
    _cli("export", "--run", run_dir[15:], "--variant", "graphsage", "--out", tmp_path / "b")
    parent = Bundle(tmp_path / "b")
    entry = parent.manifest["graph"]
    assert entry["model"] == "graphsage" and parent.manifest["text_encoder"]["inductive"]

    def network_output(bundle: Bundle) -> np.ndarray:
        state = torch.load(bundle.folder / entry["file"], weights_only=True)
        features = torch.as_tensor(np.load(bundle.folder / entry["features"]))
        with torch.no_grad():
            return GraphSAGE.network(state, entry)(
                features, graph_adjacency(bundle.seen, False)).numpy()

    assert np.allclose(network_output(parent), np.vstack([parent.users, parent.items]),
                       atol=1e-4)  # the exported state reproduces the exported vectors
    rows = [(str(u), "NEW-ITEM") for u in range(0, 60, 2)] + [("new-user", "3"),
                                                               ("new-user", "NEW-ITEM")]
    item_text = "Cozy ramen bar with spicy miso broth and late-night hours."
    (tmp_path / "items.json").write_text(json.dumps({"item_id": "NEW-ITEM",
                                                     "profile": item_text}) + "\n")
    (tmp_path / "users.json").write_text("".join(json.dumps(
        {"user_id": user, "profile": text}) + "\n" for user, text in (
        ("quiet-user", "Loves sushi."), ("new-user", "Late dinners, spicy food."))))
    monkeypatch.setattr(graph_update, "SAGE_EPOCHS", 0)  # the inductive pass alone first
    _cli("update", "--bundle", tmp_path / "b", "--interactions",
         _write_csv(tmp_path / "d.csv", rows), "--item-profiles", tmp_path / "items.json",
         "--user-profiles", tmp_path / "users.json")
    bundle = Bundle(tmp_path / "b")
    steps = {s["step"]: s for s in bundle.manifest["changes"]["steps"]}
    assert steps["GraphSAGE inductive pass"]["new_nodes"] == 3  # two users, one item
    assert steps["GraphSAGE inductive pass"]["features_from_text"] == 3
    assert np.allclose(network_output(bundle), np.vstack([bundle.users, bundle.items]),
                       atol=1e-4)  # this version's vectors are its own state's
    state = torch.load(bundle.folder / entry["file"], weights_only=True)
    new_item_node = len(bundle.users) + bundle.item_row("NEW-ITEM")
    assert state["id_mask"][new_item_node].item() == 0  # no id embedding: inductive
    features = np.load(bundle.folder / entry["features"])
    encoded = parent.encoder.encode([item_text], show_progress=False)[0]
    assert np.allclose(features[new_item_node], encoded, atol=1e-5)
    encoded = parent.encoder.encode(["Late dinners, spicy food.", "Loves sushi."],
                                    show_progress=False)  # as the update batches them
    assert np.allclose(features[bundle.user_row("new-user")], encoded[0], atol=1e-5)
    quiet = bundle.user_row("quiet-user")
    net = sage_cold_start_network(bundle.folder, entry)
    assert np.allclose(bundle.users[quiet], sage_cold_start(net, features[quiet][None, :])[0],
                       atol=1e-4)
    alone = parent.encoder.encode(["Loves sushi."], show_progress=False)  # as a query
    assert np.allclose(bundle.embed_profile("Loves sushi."), sage_cold_start(net, alone)[0],
                       atol=1e-4)
    assert bundle.item_row("NEW-ITEM") in bundle.retriever.row_to_item
    # two layers: a known user moves only through a neighbour whose neighbours changed
    near = set(parent.seen[:, parent.item_row("3")].nonzero()[0])
    touched = {parent.user_row(str(u)) for u in range(0, 60, 2)}
    untouched = [r for r in range(len(parent.users)) if r not in near | touched]
    assert np.allclose(bundle.users[untouched], parent.users[untouched], atol=1e-5)
    assert not np.allclose(bundle.users[sorted(near - touched)],
                           parent.users[sorted(near - touched)], atol=1e-5)
    monkeypatch.undo()  # the default: a few passes of training after the nodes join
    _cli("update", "--bundle", tmp_path / "b", "--interactions",
         _write_csv(tmp_path / "e.csv", [("1", "OTHER-ITEM"), ("5", "OTHER-ITEM")]))
    trained = Bundle(tmp_path / "b")
    steps = {s["step"]: s for s in trained.manifest["changes"]["steps"]}
    assert steps["GraphSAGE inductive pass"]["epochs"].startswith(
        f"{graph_update.SAGE_EPOCHS}: kept (no validation pairs")
    after = torch.load(trained.folder / entry["file"], weights_only=True)
    assert not torch.allclose(after["project.weight"], state["project.weight"])
    assert after["id_mask"][len(trained.users) + trained.item_row("OTHER-ITEM")].item() == 0
    assert np.allclose(network_output(trained), np.vstack([trained.users, trained.items]),
                       atol=1e-4)
    held_out = [(parent.user_ids[u], parent.item_ids[(u * 7) % len(parent.item_ids)])
                for u in range(40) if not parent.seen[u, (u * 7) % len(parent.item_ids)]]
    _cli("update", "--bundle", tmp_path / "b", "--interactions",
         _write_csv(tmp_path / "f.csv", [("2", "THIRD-ITEM")]),
         "--validation", _write_csv(tmp_path / "v.csv", held_out), "--max-drop", "1")
    checked = Bundle(tmp_path / "b")  # validation chose the trained or the untrained state
    steps = {s["step"]: s for s in checked.manifest["changes"]["steps"]}
    assert "validation Recall@20" in steps["GraphSAGE inductive pass"]["epochs"]
    assert np.allclose(network_output(checked), np.vstack([checked.users, checked.items]),
                       atol=1e-4)
    # a run saved before the features were kept: its bundle is updated by the fold-in rule
    for name in ("user_features.npy", "item_features.npy"):
        (Path(run_dir[15:]) / "models" / "graphsage" / name).unlink()
    _cli("export", "--run", run_dir[15:], "--variant", "graphsage", "--out", tmp_path / "old")
    assert Bundle(tmp_path / "old").manifest["graph"] is None
    _cli("update", "--bundle", tmp_path / "old", "--interactions", tmp_path / "e.csv")
    steps = [s["step"] for s in Bundle(tmp_path / "old").manifest["changes"]["steps"]]
    assert "GraphSAGE inductive pass" not in steps and "users" in steps


def test_a_failed_update_leaves_the_current_version_untouched(store, tmp_path, monkeypatch):
    before = sorted(p.name for p in (store / "versions").iterdir())
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\n1,2\n")
    with pytest.raises(DataError, match="bad.csv:1: header must name 'user' and 'item'"):
        update_bundle(store, bad)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(update_module, "seal_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        update_bundle(store, _write_csv(tmp_path / "ok.csv", [("1", "2")]))
    assert BundleStore(store).current() == "v0001"
    assert sorted(p.name for p in (store / "versions").iterdir()) == before  # no leftovers


def test_rollback_restores_the_parent_exactly(store, tmp_path):
    first = Bundle(store)
    answers = {u: first.recommend(u, 20) for u in ("1", "7", "33")}
    digest = (first.folder / "manifest.sha256").read_text()
    _cli("update", "--bundle", store, "--interactions",
         _write_csv(tmp_path / "b.csv", [("1", str(i)) for i in range(100, 130)]))
    assert Bundle(store).recommend("1", 20) != answers["1"]
    assert "current version is now v0001" in _cli("versions", "--bundle", store, "--rollback")
    again = Bundle(store)
    assert again.version == "v0001" and (again.folder / "manifest.sha256").read_text() == digest
    assert {u: again.recommend(u, 20) for u in answers} == answers
    listed = _cli("versions", "--bundle", store).splitlines()
    assert listed[1].startswith("v0001\tTrue\tNone\tfull")
    assert listed[2].startswith("v0002\tFalse\tv0001\tupdate")


def test_an_update_that_hurts_validation_is_not_made_current(store, tmp_path):
    bundle = Bundle(store)
    rng = np.random.default_rng(0)
    users = bundle.user_ids[:200]
    junk = [(u, str(i)) for u in users for i in rng.choice(400, 40, replace=False)]
    held_out = []
    for user in users:  # each user's own best-ranked items stand for what they want next
        held_out += [(user, i) for i, _ in bundle.recommend(user, 5)]
    result = update_bundle(store, _write_csv(tmp_path / "junk.csv", junk),
                           validation=_write_csv(tmp_path / "val.csv", held_out),
                           max_drop=0.02)
    assert not result.made_current and "not made current" in result.report["validation"]
    assert BundleStore(store).current() == "v0001"
    assert result.version in BundleStore(store).versions()  # kept, for inspection


def test_the_service_follows_the_current_pointer(store, tmp_path):
    from model.service import create_app
    from test_service import serving

    with serving(create_app(store, watch_seconds=0.1)) as client:
        assert client.get("/ready").json()["bundle"].startswith("bundle/v0001@")
        _cli("update", "--bundle", store, "--interactions",
             _write_csv(tmp_path / "c.csv", [("1", "NEW-ITEM"), ("2", "NEW-ITEM")]))
        deadline = time.monotonic() + 20
        while not client.get("/ready").json()["bundle"].startswith("bundle/v0002@"):
            assert time.monotonic() < deadline, "the new current version was not swapped in"
            time.sleep(0.1)
        assert client.get("/items/NEW-ITEM/similar?k=3").status_code == 200
        _cli("versions", "--bundle", store, "--rollback")
        while not client.get("/ready").json()["bundle"].startswith("bundle/v0001@"):
            assert time.monotonic() < deadline, "the rollback was not followed"
            time.sleep(0.1)
        assert client.get("/items/NEW-ITEM/similar").status_code == 404
    assert json.loads(json.dumps(BundleStore(store).history()))[1]["parent"] == "v0001"


def test_fold_in_rules_on_hand_checked_data():
    from model.foldin import FoldIn

    items = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], dtype=np.float32)
    seen = np.array([[1, 1, 0], [0, 0, 0], [0, 2, 1]], dtype=np.float32)
    import scipy.sparse as sp

    mean = FoldIn("mean").vectors(sp.csr_matrix(seen), items)
    assert np.allclose(mean, [[0.5, 1.0], [0.0, 0.0], [1.5, 1.5]])  # counts do not weigh
    als = FoldIn("als", alpha=10.0, regularization=0.5).vectors(sp.csr_matrix(seen), items)
    for row, wanted in ((0, [0, 1]), (2, [1, 2])):
        chosen = items[wanted].astype(np.float64)
        system = items.T @ items + 9.0 * chosen.T @ chosen + 0.5 * np.eye(2)
        assert np.allclose(als[row], np.linalg.solve(system, 10.0 * chosen.sum(axis=0)),
                           rtol=1e-3)
    assert not als[1].any()  # no interactions: no vector


def test_an_update_that_keeps_validation_is_made_current_and_removed_items_leave(store,
                                                                                 tmp_path):
    bundle = Bundle(store)
    held_out = [(u, i) for u in bundle.user_ids[:100] for i, _ in bundle.recommend(u, 3)]
    gone = bundle.recommend("5", 1)[0][0]
    (tmp_path / "gone.txt").write_text(gone + "\n")
    result = update_bundle(store, _write_csv(tmp_path / "small.csv", [("5", "NEW-ITEM")]),
                           remove_items=tmp_path / "gone.txt",
                           validation=_write_csv(tmp_path / "val.csv", held_out))
    assert result.made_current and "made current" in result.report["validation"]
    updated = Bundle(store)
    assert updated.manifest["removed_rows"] == [bundle.item_row(gone)]
    assert all(gone not in [i for i, _ in updated.recommend(u, 50)] for u in ("5", "6", "7"))
    assert gone not in [i for i, _ in updated.similar_items("NEW-ITEM", 400)]


def test_stream_replays_demo_data_and_reports_every_step(tmp_path):
    output = _cli("stream", "--dataset", "demo", "--steps", "2", "--no-tune-baselines",
                  "--data-root", tmp_path / "data", "--runs-dir", tmp_path / "runs")
    folder = Path(output.strip().splitlines()[-1].split("written to ")[1].split("/stream.md")[0])
    report = json.loads((folder / "stream.json").read_text())
    assert [row["step"] for row in report["rows"]] == [0, 1, 2]
    assert all(r["new_items_retrievable"] == r["new_items_so_far"] > 0 for r in report["rows"][1:])
    assert report["rows"][0]["ratio_recall@20"] == 1.0  # version 1 is the base model itself
    assert all(0.8 < r["ratio_recall@20"] < 1.2 for r in report["rows"])
    assert BundleStore(folder / "bundle").versions() == ["v0001", "v0002", "v0003"]
    assert {"stream.md", "stream.html", "stream.png"} <= {p.name for p in folder.iterdir()}


def test_stream_follows_timestamps_when_the_data_has_them(tmp_path):
    import pandas as pd

    from dataHandler import load_dataset, make_demo_dataset
    from model.stream import timestamp_steps

    folder = tmp_path / "timed"
    folder.mkdir()
    make_demo_dataset(folder, seed=3)
    train = pd.read_csv(folder / "train.csv")
    train["timestamp"] = np.random.default_rng(0).permutation(len(train)) + 1_600_000_000
    train.to_csv(folder / "train.csv", index=False)
    dataset = load_dataset(folder)
    arrival, _ = timestamp_steps(dataset.train, folder, 2)
    coo = dataset.train.tocoo()
    first = train.groupby(["user", "item"])["timestamp"].min()
    times = first.loc[list(zip(coo.row, coo.col))].to_numpy()
    assert abs((arrival > 0).mean() - 0.2) < 0.01  # the newest fifth streams in
    assert times[arrival == 0].max() < times[arrival == 1].min()  # in time order
    assert times[arrival == 1].max() < times[arrival == 2].min()
    output = _cli("stream", "--dataset", folder, "--steps", "2", "--no-tune-baselines",
                  "--runs-dir", tmp_path / "runs")
    assert "Arrival: timestamp." in output


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranked")
    output = _cli("run", "--dataset", "demo", "--model", "als", "--rank", "widedeep",
                  "--rank-on", "als", "--rank-epochs", "1", "--data-root", root / "data",
                  "--runs-dir", root / "runs")
    return Path([l for l in output.splitlines() if l.startswith("run written to ")][-1][15:])


def test_removed_items_leave_ranked_answers_and_do_not_fail_the_check(ranked_run, tmp_path):
    _cli("export", "--run", ranked_run, "--variant", "als", "--out", tmp_path / "bundle")
    store = tmp_path / "bundle"
    before = Bundle(store)
    users = before.user_ids[:60]
    ranked = {u: [i for i, _ in before.recommend(u, 20, rank=True)] for u in users}
    held_out = [(u, i) for u in users for i in ranked[u][:3]]
    gone = max({i for _, i in held_out}, key=[i for _, i in held_out].count)
    assert [i for _, i in held_out].count(gone) >= 5  # removing it would cost > 2% of hits
    (tmp_path / "gone.txt").write_text(gone + "\n")
    kept = tmp_path / "kept"  # the same day without the removal
    shutil.copytree(store, kept, symlinks=True)
    update_bundle(kept, _write_csv(tmp_path / "tiny.csv", [("5", "NEW-ITEM")]))
    result = update_bundle(store, tmp_path / "tiny.csv", remove_items=tmp_path / "gone.txt",
                           validation=_write_csv(tmp_path / "val.csv", held_out))
    assert result.made_current, result.report["validation"]  # removal is not a regression
    after, without = Bundle(store), Bundle(kept)
    for user in users:
        now = [i for i, _ in after.recommend(user, 20, rank=True)]
        assert gone not in now and len(now) == 20
        other = [i for i, _ in without.recommend(user, 20, rank=True)]
        if gone not in other:
            assert now == other  # nobody else's ranked list moves


def test_interaction_files_with_bad_rows_stop_at_their_line(store, tmp_path):
    cases = {"user,item,timestamp\n1,2,1600000000\n3,4,\n": ":3: timestamp '' is neither",
             "user,item\n1,2\n\n3,4,5\n": ":4: more fields than the header",
             "user,item,user\n1,2,3\n": ":1: a column is named twice",
             "user,item,timestamp\n1,2,1600000000\n3,4,2024-01-01\n": ":3: timestamp '2024-01-01'",
             "user,item\n1, \n": ":2: empty user or item id"}
    for number, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"case{number}.csv"
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            update_bundle(store, path)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\r\n 1 ,NEW,999\r\n1,2,1000\r\n")
    result = update_bundle(store, bom)
    manifest = Bundle(store).manifest
    assert result.report["new_items"] == 1 and Bundle(store).item_row("NEW") >= 400
    assert manifest["data_cutoff"]["latest_timestamp"] == "1000"  # compared as numbers
    assert BundleStore(store).versions() == ["v0001", "v0002"]  # the bad files wrote nothing


def test_stream_sends_a_held_back_increment_again(tmp_path):
    from dataHandler import open_dataset
    from model.stream import Stream

    dataset = open_dataset("demo", tmp_path / "data")
    stream = Stream(dataset, None, "als", 3, tmp_path, 0)
    stream.held_back = [1]
    increment, _ = stream._increment_files(2, np.arange(dataset.n_users))
    sent = len(increment.read_text().splitlines()) - 1
    assert sent == int(np.isin(stream.arrival, [1, 2]).sum()) > (stream.arrival == 2).sum()


def test_a_new_item_with_only_a_profile_is_retrievable_through_its_text(tmp_path, tiny_roberta):
    output = _cli("run", "--dataset", "demo", "--model", "text", "--base-model", tiny_roberta,
                  "--layers", "2", "--no-quantize", "--data-root", tmp_path / "data",
                  "--runs-dir", tmp_path / "runs", "--cache-dir", tmp_path / "cache")
    run = [l for l in output.splitlines() if l.startswith("run written to ")][-1][15:]
    _cli("export", "--run", run, "--variant", "text", "--out", tmp_path / "bundle")
    text = "Spicy Sichuan dishes, hot pot and late-night dining downtown."
    profiles = tmp_path / "items.json"
    profiles.write_text(json.dumps({"item_id": "HOTPOT-1", "profile": text + " a@b.com"}) + "\n")
    result = update_bundle(tmp_path / "bundle", _write_csv(tmp_path / "day.csv", [("1", "2")]),
                           item_profiles=profiles)
    assert result.report["steps"][3]["encoded_profiles"] == 1  # only the new profile
    bundle = Bundle(tmp_path / "bundle")
    assert bundle.item_row("HOTPOT-1") in bundle.retriever.row_to_item
    assert bundle.item_profile("HOTPOT-1").endswith("[EMAIL]")  # cleaned before it is stored
    found = _cli("recommend", "--bundle", tmp_path / "bundle", "--profile", text + " [EMAIL]",
                 "-k", "1")
    assert found.splitlines()[-1].split("\t")[1] == "HOTPOT-1"


def test_where_filters_keep_the_order_among_matching_items(store, ranked_run, tmp_path):
    bundle = Bundle(store)
    table = __import__("pandas").read_parquet(bundle.folder / "items.parquet")
    tucson = set(table.loc[table["attr_city"] == "Tucson", "id"])
    everything = [i for i, _ in bundle.recommend("3", len(bundle.item_ids))]
    only = [i for i, _ in bundle.recommend("3", 10, where={"city": "tucson"})]
    assert only == [i for i in everything if i in tucson][:10]  # same order, case-insensitive
    thai = bundle.recommend("3", 5, where={"categories": "Thai", "city": "Tucson"})
    by_id = table.set_index("id")
    assert all("Thai" in by_id.loc[i, "attr_categories"].split(", ")
               and by_id.loc[i, "attr_city"] == "Tucson" for i, _ in thai)
    with pytest.raises(Exception, match="unknown item attribute.*can filter by categories"):
        bundle.recommend("3", 5, where={"colour": "red"})
    shown = _cli("recommend", "--bundle", store, "--user", "3", "--where", "city=Tucson",
                 "-k", "3")
    assert [l.split("\t")[1] for l in shown.splitlines()[-3:]] == only[:3]
    rare = table["attr_categories"].str.split(", ").explode().value_counts().index[-1]
    few = bundle.recommend("3", 50, where={"categories": rare})
    assert 0 < len(few) < 50  # fewer matches than k: a short list, no padding
    _cli("export", "--run", ranked_run, "--variant", "als", "--out", tmp_path / "ranked")
    ranker_bundle = Bundle(tmp_path / "ranked")
    union = [i for i, _ in ranker_bundle.recommend("3", 1000, rank=True)]
    ranked = ranker_bundle.recommend("3", 10, rank=True, where={"city": "Tucson"})
    assert [i for i, _ in ranked] == [i for i in union if i in tucson][:10]  # same scores
    described = tmp_path / "new_items.json"
    described.write_text(json.dumps({"item_id": "N", "profile": "A new Thai kitchen.",
                                     "city": "Tucson", "categories": ["Thai"]}) + "\n")
    updated = update_bundle(tmp_path / "ranked", _write_csv(tmp_path / "d.csv", [("3", "N")]),
                            item_profiles=described)
    after = Bundle(tmp_path / "ranked")
    new_row = after.item_row("N")
    assert updated.made_current and np.array_equal(  # kept, and the new item's own added
        after.items_matching({"city": "Tucson"}),
        np.append(ranker_bundle.items_matching({"city": "Tucson"}), new_row))
    assert new_row in after.items_matching({"categories": "thai"})


def test_the_service_ranks_a_user_who_joined_after_the_ranker(ranked_run, tmp_path):
    """An update grows the ranker's features to its new rows, so a user who joined in it
    is ranked like any other (the ranker's own candidates from their fold-in)."""
    from model.service import create_app
    from test_service import serving

    _cli("export", "--run", ranked_run, "--variant", "als", "--out", tmp_path / "bundle")
    update_bundle(tmp_path / "bundle", _write_csv(tmp_path / "new.csv",
                                                  [("late-user", "3"), ("late-user", "9")]))
    with serving(create_app(tmp_path / "bundle", watch_seconds=0)) as client:
        assert client.get("/users/late-user/recommendations?k=5").status_code == 200
        ranked = client.get("/users/late-user/recommendations?k=5&rank=true")
        assert ranked.status_code == 200, ranked.text
        listed = [entry["id"] for entry in ranked.json()["items"]]
        assert len(listed) == 5 and not {"3", "9"} & set(listed)  # seen items excluded
        assert client.get("/users/3/recommendations?k=5&rank=true").status_code == 200


def test_an_approximate_index_is_exported_measured_and_kept_by_updates(als_run, tmp_path):
    root = tmp_path / "hnsw"
    _cli("export", "--run", als_run, "--variant", "als", "--out", root, "--index", "hnsw")
    bundle = Bundle(root)
    index = bundle.manifest["index"]
    assert index["type"] == "IndexHNSWFlat" and bundle.retriever.kind == "hnsw"
    assert index["overlap@20_by_width"][str(index["width"])] >= index["target"]
    assert bundle.retriever.search_width() == index["width"]
    exact = json.loads((als_run / "metrics.json").read_text())["variants"]["als"]["metrics"]
    assert index["metrics_exact_search"] == exact  # the run's exact figures, kept beside
    assert "reproduced" in _cli("evaluate", "--bundle", root)  # this index's own figures
    _cli("update", "--bundle", root, "--interactions",
         _write_csv(tmp_path / "a.csv", [("0", "NEW-ITEM"), ("2", "NEW-ITEM")]))
    updated = Bundle(root)
    checked = updated.manifest["index"]  # checked again on the new vectors, not copied
    assert updated.version == "v0002" and checked["calibrated_in"] == "v0002"
    assert updated.retriever.kind == ("hnsw" if checked["type"] == "IndexHNSWFlat" else "flat")
    if updated.retriever.kind == "hnsw":
        assert updated.retriever.search_width() == checked["width"] >= index["width"]


def test_sweep_cg_steps_keep_the_sweeps_within_their_share_of_a_refit():
    """Two sweeps of c CG steps cost 2 (c + 1) Gram products per row, a refit of n iterations
    n (3 + 1): c is the largest within 8% of that, between 1 and the refit's 3."""
    steps = {n: update_module.sweep_cg_steps(n, 3) for n in (3, 15, 20, 25, 100)}
    assert steps == {3: 1, 15: 1, 20: 2, 25: 3, 100: 3}
    for n, c in steps.items():
        assert c == 1 or update_module.ALS_SWEEPS * (c + 1) <= 0.08 * n * 4 + 1e-9
