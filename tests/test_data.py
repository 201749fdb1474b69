"""Loading both layouts, profiles built without leakage, clear errors, atomic preparation."""
import http.server
import json
import threading
import zipfile
from functools import partial

import numpy as np
import pytest

from conftest import write_easyrec, write_json_lines
from dataHandler import (DataError, build_user_profiles, item_profile_from_metadata,
                         load_dataset, make_demo_dataset, prepare_dataset)


def test_easyrec_layout_round_trip(easyrec_folder):
    data = load_dataset(easyrec_folder)
    assert (data.n_users, data.n_items) == (4, 5)
    assert data.train[0, 0] == 2 and data.train.nnz == 6
    assert data.user_ids == ["U0", "U1", "U2", "U3"] and data.item_ids[4] == "B4"
    assert data.user_profiles[1] == "Likes coffee."
    assert list(data.item_profile_source) == ["written"] * 3 + ["none", "written"]
    coverage = data.text_coverage()
    assert coverage["users"] == {"written": 1, "built": 2, "none": 1, "written_fraction": 0.25}
    assert coverage["items"]["none"] == 1


def test_built_user_profile_uses_training_items_only(easyrec_folder):
    data = load_dataset(easyrec_folder)
    # user 0 trained on items 0 (twice) and 1; item 2 is only in their validation split
    assert data.user_profile_source[0] == "built"
    assert data.user_profiles[0] == ("Visited: Thai restaurant in Tucson. | "
                                     "Coffee shop with pastries.")
    assert all("VALIDATION-ONLY" not in (p or "") for p in data.user_profiles)
    # user 2 trained only on item 3, which has no profile: no text is invented
    assert data.user_profiles[2] is None and data.user_profile_source[2] == "none"


def test_build_user_profiles_orders_by_visits_then_id():
    import scipy.sparse as sp
    train = sp.csr_matrix(np.array([[1, 3, 1]], dtype=np.float32))
    profiles = build_user_profiles(train, ["A. x", "B.", "C."], max_items=2)
    assert profiles == ["Visited: B. | A."]


def test_csv_layout_sums_repeated_rows(tmp_path):
    folder = tmp_path / "csvset"
    folder.mkdir()
    (folder / "train.csv").write_text("user,item\n0,1\n0,1\n1,2\n")
    (folder / "val.csv").write_text("user,item\n1,0\n")
    (folder / "test.csv").write_text("user,item\n0,2\n")
    data = load_dataset(folder)
    assert data.train.shape == (2, 3) and data.train[0, 1] == 2


@pytest.mark.parametrize("content, where", [
    ('{"item_id": 0, "profile": "ok"}\n{"item_id": 1, "profile": \n', "item_profile.json:2"),
    ('{"item_id": 0, "profile": "ok"}\n\n{"item_id": 9, "profile": "x"}\n', "item_profile.json:3"),
    ('{"profile": "no id"}\n', "item_profile.json:1"),
])
def test_bad_profile_lines_name_file_and_line(easyrec_folder, content, where):
    (easyrec_folder / "item_profile.json").write_text(content)
    with pytest.raises(DataError, match=where.replace(".", r"\.")):
        load_dataset(easyrec_folder)


def test_out_of_range_profile_says_so(easyrec_folder):
    write_json_lines(easyrec_folder / "user_profile.json", [{"user_id": 4, "profile": "x"}])
    with pytest.raises(DataError, match=r"user_profile\.json:1: user_id 4 out of range"):
        load_dataset(easyrec_folder)


def test_disagreeing_matrix_shapes_are_named(tmp_path):
    folder = write_easyrec(tmp_path / "bad", np.eye(3), np.eye(3), np.ones((3, 4)))
    with pytest.raises(DataError, match=r"tst_mat\.pkl 3x4"):
        load_dataset(folder)


def test_empty_test_split_is_an_error(tmp_path):
    folder = write_easyrec(tmp_path / "bad", np.eye(3), np.eye(3), np.zeros((3, 3)))
    with pytest.raises(DataError, match="test split is empty"):
        load_dataset(folder)


def test_bad_csv_value_names_line(tmp_path):
    folder = tmp_path / "csvset"
    folder.mkdir()
    (folder / "train.csv").write_text("user,item\n0,1\n0,x\n")
    (folder / "val.csv").write_text("user,item\n")
    (folder / "test.csv").write_text("user,item\n0,0\n")
    with pytest.raises(DataError, match=r"train\.csv:3: item id"):
        load_dataset(folder)


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no interaction files"):
        load_dataset(tmp_path)


def test_item_profile_from_metadata_states_only_given_facts():
    text = item_profile_from_metadata({"name": "BK Tacos", "categories": "Mexican, Hot Dogs",
                                       "city": "Tucson", "state": "AZ", "stars": 4,
                                       "attributes": {"takeout": True, "wifi": False}})
    assert text == "BK Tacos (Mexican, Hot Dogs) in Tucson, AZ. Rated 4.0 stars. Offers takeout."
    assert item_profile_from_metadata({}) is None


def test_prepare_copies_source_and_writes_built_profiles(easyrec_folder, tmp_path):
    folder = prepare_dataset("mine", tmp_path / "data", source=easyrec_folder)
    assert (folder / "trn_mat.pkl").exists()
    built = [json.loads(line) for line in (folder / "user_profile.built.json").open()]
    assert [b["user_id"] for b in built] == [0, 3]


def test_prepare_leaves_nothing_behind_on_bad_source(easyrec_folder, tmp_path):
    (easyrec_folder / "item_profile.json").write_text("not json\n")
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"item_profile\.json:1"):
        prepare_dataset("mine", root, source=easyrec_folder)
    # no half-filled dataset folder, no temp folder (the empty lock file of preparation stays)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nope'.*yelp-text"):
        prepare_dataset("nope", tmp_path)


def test_download_from_loopback_server(easyrec_folder, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "data.zip", "w") as archive:
        for path in easyrec_folder.iterdir():
            archive.write(path, f"data/tinyset/{path.name}")
        archive.writestr("data/other/trn_mat.pkl", b"not this one")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        folder = prepare_dataset("tinyset", tmp_path / "data", url=url)
    finally:
        server.shutdown()
    assert load_dataset(folder).user_ids[3] == "U3"


def test_demo_generation_is_deterministic(tmp_path):
    make_demo_dataset(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None, seed=7)
    make_demo_dataset(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None, seed=7)
    for name in ("train.csv", "test.csv", "item_meta.json", "user_profile.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    data = load_dataset(tmp_path / "a")
    assert data.text_coverage()["items"]["built"] == data.n_items
    assert set(np.unique(data.user_profile_source)) == {"written", "built"}


def test_generated_demo_data_follows_the_seed(tmp_path):
    from dataHandler import prepare_dataset

    default = prepare_dataset("demo", tmp_path, seed=2023)
    other = prepare_dataset("demo", tmp_path, seed=7)
    assert default.name == "demo" and other.name == "demo-seed7"
    assert (default / "train.csv").read_text() != (other / "train.csv").read_text()


@pytest.mark.parametrize("rows, message", [
    ("0,0\n1,2e1\n", "item id must be a non-negative integer, got '2e1'"),
    ("0,0\n3000000000,1\n", "user id 3,000,000,000 but only 2 distinct user ids"),
])
def test_csv_ids_that_are_not_row_numbers_are_refused(tmp_path, rows, message):
    from dataHandler import DataError, load_dataset

    for name in ("train.csv", "val.csv", "test.csv"):
        (tmp_path / name).write_text("user,item\n" + rows)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path)


def test_non_numeric_stars_are_left_out_of_a_built_profile():
    from dataHandler import item_profile_from_metadata

    text = item_profile_from_metadata({"name": "Cafe", "stars": "great"})
    assert text == "Cafe." or ("Cafe" in text and "stars" not in text)


def test_synthetic_data_is_labelled_seeded_heavy_tailed_and_loads(tmp_path):
    from click.testing import CliRunner

    from main import cli

    args = ["synth", "--users", "2000", "--items", "300", "--interactions", "20000", "--seed",
            "5"]
    for name in ("a", "b"):
        result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    first, again = ((tmp_path / name / "train.csv").read_bytes() for name in ("a", "b"))
    assert first == again
    assert "for scale measurements only" in (tmp_path / "a" / "SYNTHETIC.md").read_text()
    dataset = load_dataset(tmp_path / "a")
    total = dataset.train.nnz + dataset.val.nnz + dataset.test.nnz
    assert total == 20000 and 0.75 < dataset.train.nnz / total < 0.85
    popularity = np.asarray((dataset.train > 0).sum(axis=0)).ravel()
    assert popularity.max() > 10 * np.median(popularity)  # a long tail, not uniform
    assert dataset.item_profiles[0].startswith("Synthetic item 0")
    refused = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code != 0 and "--overwrite" in refused.output


def test_llm_profiles_fill_in_where_the_datas_own_profiles_are_missing(easyrec_folder):
    write_json_lines(easyrec_folder / "user_profile.json", [
        {"user_id": 1, "profile": "Likes coffee."}, {"user_id": 2, "profile": "  "}])
    write_json_lines(easyrec_folder / "user_profile.llm.json", [
        {"user_id": 1, "profile": "LLM text that must not win"},
        {"user_id": 2, "profile": "Enjoys gyms."}, {"user_id": 3, "profile": "Loves Thai."}])
    dataset = load_dataset(easyrec_folder)
    assert dataset.user_profiles[1:] == ["Likes coffee.", "Enjoys gyms.", "Loves Thai."]
    assert list(dataset.user_profile_source[1:]) == ["written"] * 3
