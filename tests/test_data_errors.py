"""One-line data errors that name what is wrong: a split file missing from a layout whose other
files are there, a CSV row with too many fields (at the line an editor shows); and the step
count `bench` prints for a graph model's epoch."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import bench
import model.graph as graph
from conftest import write_easyrec
from dataHandler import DataError, load_dataset, make_demo_dataset, prepare_dataset
from main import cli

PAIRS = "user,item\n0,1\n1,0\n1,1\n"


def _csv_folder(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.csv").write_text(text)
    return folder


def test_a_csv_folder_without_val_csv_names_it(tmp_path):
    folder = _csv_folder(tmp_path / "miss", train=PAIRS, test=PAIRS)
    expected = f"{folder}: val.csv is missing (found train.csv, test.csv)"
    with pytest.raises(DataError) as caught:
        load_dataset(folder)
    assert str(caught.value) == expected
    with pytest.raises(DataError, match=r"val\.csv is missing"):
        prepare_dataset(str(folder))
    result = CliRunner().invoke(cli, ["run", "--dataset", str(folder), "--model", "als"])
    assert result.exit_code != 0 and result.output == f"Error: {expected}\n"


def test_a_pickle_folder_names_its_missing_matrices(tmp_path):
    folder = write_easyrec(tmp_path / "pk", *[np.eye(3)] * 3)
    for name in ("val_mat.pkl", "tst_mat.pkl"):
        (folder / name).unlink()
    with pytest.raises(DataError) as caught:
        load_dataset(folder)
    assert str(caught.value) == f"{folder}: val_mat.pkl, tst_mat.pkl are missing " \
                                "(found trn_mat.pkl)"


def test_partial_layouts_are_each_named_and_a_complete_one_still_loads(tmp_path):
    folder = _csv_folder(tmp_path / "both", train=PAIRS)
    write_easyrec(tmp_path / "pk", *[np.eye(3)] * 3)
    (folder / "tst_mat.pkl").write_bytes((tmp_path / "pk" / "tst_mat.pkl").read_bytes())
    with pytest.raises(DataError) as caught:
        load_dataset(folder)
    assert str(caught.value) == (f"{folder}: trn_mat.pkl, val_mat.pkl are missing (found "
                                 "tst_mat.pkl); val.csv, test.csv are missing (found train.csv)")
    _csv_folder(folder, val=PAIRS, test=PAIRS)
    assert load_dataset(folder).train.nnz == 3  # the complete CSV layout; the stray pickle aside
    with pytest.raises(DataError, match="no interaction files found; expected"):
        load_dataset(_csv_folder(tmp_path / "empty"))


def test_a_row_with_an_extra_field_names_file_and_line(tmp_path):
    folder = _csv_folder(tmp_path / "bad", train=PAIRS + "2,1,7\n", val=PAIRS, test=PAIRS)
    with pytest.raises(DataError) as caught:
        load_dataset(folder)
    assert str(caught.value) == f"{folder / 'train.csv'}:5: expected 2 fields, saw 3"


@pytest.mark.parametrize("text, line", [
    ("user,item\n\n0,1\n\n1,2,3\n", 5),  # blank lines count, as in an editor
    ('user,item,review\n0,1,"good\nfood"\n1,2,ok,extra\n', 4),  # pandas says line 3
    ("user,item\r\n0,1\r\n1,2,3\r\n", 3),
])
def test_the_line_named_is_the_one_an_editor_shows(tmp_path, text, line):
    folder = _csv_folder(tmp_path / "bad", train=text, val=PAIRS, test=PAIRS)
    with pytest.raises(DataError, match=rf"train\.csv:{line}: expected \d fields, saw \d+$"):
        load_dataset(folder)


def test_other_csv_errors_keep_pandas_text_on_one_line(tmp_path):
    folder = _csv_folder(tmp_path / "bad", train=PAIRS + '2,"1\n', val=PAIRS, test=PAIRS)
    with pytest.raises(DataError) as caught:
        load_dataset(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'train.csv'}: malformed CSV (Error tokenizing")
    assert "\n" not in message and message.endswith(")")


def test_bench_prints_the_steps_an_epoch_takes(tmp_path, monkeypatch, capsys):
    make_demo_dataset(tmp_path, n_users=60, n_items=80, seed=3)
    epochs = []  # (batch given, optimiser steps taken) per call
    real = graph.bpr_epoch

    def counting(module, embed, optimiser, train, batch, *args, **kwargs):
        epochs.append([batch, 0])
        step = optimiser.step

        def counted(*a, **k):
            epochs[-1][1] += 1
            return step(*a, **k)
        optimiser.step = counted
        return real(module, embed, optimiser, train, batch, *args, **kwargs)

    monkeypatch.setattr(graph, "bpr_epoch", counting)
    bench.bench_graph(load_dataset(tmp_path))
    printed = [line for line in capsys.readouterr().out.splitlines() if "one epoch" in line]
    assert len(printed) == len(epochs) == 2
    for line, (batch, steps) in zip(printed, epochs):
        assert line.endswith(f"({steps} steps of {batch} triples)") and steps > 1, line
