"""Reliability: outputs never delete what the tool did not write; data files cannot run
code."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from conftest import write_easyrec
from main import cli


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliable")
    args = ["run", "--dataset", "demo", "--model", "lightgcn", "--epochs", "2",
            "--data-root", str(root / "data"), "--runs-dir", str(root / "runs")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Path([l for l in result.output.splitlines() if l.startswith("run written to ")][-1][15:])


def _users_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "my-folder"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


@pytest.mark.parametrize("command", ["export", "ab"])
def test_an_output_never_replaces_a_folder_the_tool_did_not_write(small_run, tmp_path, command):
    folder = _users_folder(tmp_path)
    args = {"export": ["export", "--run", str(small_run), "--variant", "lightgcn"],
            "ab": ["ab", "--a", str(small_run), "--b", str(small_run)]}[command]
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(cli, [*args, "--out", str(folder), *extra])
        assert result.exit_code != 0 and "was not written by this tool" in result.output
        assert (folder / "thesis.tex").read_text() == "years of work"
        assert sorted(os.listdir(folder)) == ["thesis.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["my-folder"]  # no staging left behind


def test_exporting_again_adds_a_version_and_a_foreign_folder_is_refused(small_run, tmp_path):
    from model.versions import BundleStore

    args = ["export", "--run", str(small_run), "--variant", "lightgcn", "--out",
            str(tmp_path / "bundle")]
    assert "version v0001 written" in CliRunner().invoke(cli, args).output
    assert "version v0002 written" in CliRunner().invoke(cli, args).output
    store = BundleStore(tmp_path / "bundle")
    assert store.current() == "v0002" and store.parent_of("v0002") == "v0001"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(cli, [*args[:-1], str(foreign), "--overwrite"])
    assert refused.exit_code != 0 and "was not written by this tool" in refused.output
    assert os.listdir(foreign) == ["notes.txt"]


def test_shrink_refuses_a_foreign_folder(tmp_path, tiny_roberta):
    folder = _users_folder(tmp_path)
    result = CliRunner().invoke(cli, ["shrink", "--base-model", str(tiny_roberta), "--layers",
                                      "2", "--out", str(folder)])
    assert result.exit_code != 0 and "was not written by this tool" in result.output
    assert sorted(os.listdir(folder)) == ["thesis.tex"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_pickle_runs_no_code(tmp_path, monkeypatch):
    from dataHandler import DataError, load_dataset

    folder = write_easyrec(tmp_path / "data", np.eye(3), np.eye(3), np.eye(3))
    with open(folder / "trn_mat.pkl", "wb") as handle:
        pickle.dump([_Payload(), sp.csr_matrix(np.eye(3))], handle)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"trn_mat.pkl: cannot unpickle.*refusing to load "
                                        r"(posix|os)\.system"):
        load_dataset(folder)
    assert not (tmp_path / "PWNED").exists()
    write_easyrec(folder, np.eye(3), np.eye(3), np.eye(3))
    assert load_dataset(folder).train.nnz == 3  # real sparse matrices still load


def test_edited_manifest_and_differing_metrics_are_caught(small_run, tmp_path):
    import json

    from model.bundle import Bundle, BundleError, reproduction_verdict

    out = tmp_path / "bundle"
    assert CliRunner().invoke(cli, ["export", "--run", str(small_run), "--variant", "lightgcn",
                                    "--out", str(out)]).exit_code == 0
    version = out / "current"
    manifest = json.loads((version / "manifest.json").read_text())
    assert Path(manifest["data"]["data_root"]).is_absolute()
    good = CliRunner().invoke(cli, ["evaluate", "--bundle", str(out)])
    assert good.exit_code == 0 and "verdict: reproduced" in good.output
    manifest["metrics_at_export"]["recall@20"] += 0.01
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match manifest.sha256"):
        Bundle(out)
    from utils import sha256_file
    (version / "manifest.sha256").write_text(sha256_file(version / "manifest.json"))
    differs = CliRunner().invoke(cli, ["evaluate", "--bundle", str(out)])
    assert differs.exit_code == 1 and "verdict: DIFFERS" in differs.output
    manifest["files"] = {}
    (version / "manifest.json").write_text(json.dumps(manifest))
    del manifest["files"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    (version / "manifest.sha256").write_text(sha256_file(version / "manifest.json"))
    with pytest.raises(BundleError, match="missing required fields files"):
        Bundle(out)
    ok, line = reproduction_verdict({"recall@20": 0.30}, {"recall@20": 0.31}, 1e-4)
    assert not ok and "DIFFERS" in line


def test_non_utf8_profile_names_file_and_line(easyrec_folder):
    from dataHandler import DataError, load_dataset

    with open(easyrec_folder / "item_profile.json", "ab") as handle:
        handle.write(b'{"item_id": 3, "profile": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"item_profile.json:5: not UTF-8 text"):
        load_dataset(easyrec_folder)


def test_on_screen_notes_when_nothing_can_be_hit(tmp_path):
    train = np.eye(4)
    folder = write_easyrec(tmp_path / "repeats", train, train, train)  # test pairs = training
    result = CliRunner().invoke(cli, ["run", "--dataset", str(folder), "--model", "popularity",
                                      "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "note: every test pair also occurs in training" in result.output
    assert "note: K = 50 covers the whole catalogue of 4 items" in result.output


def test_bad_device_and_empty_profile_are_one_line_errors(small_run, tmp_path):
    import torch

    if not torch.cuda.is_available():
        result = CliRunner().invoke(cli, ["run", "--dataset", "demo", "--device", "cuda",
                                          "--runs-dir", str(tmp_path / "runs")])
        assert result.exit_code != 0 and "sees no CUDA device" in result.output
        assert not (tmp_path / "runs").exists()
    out = tmp_path / "bundle"
    CliRunner().invoke(cli, ["export", "--run", str(small_run), "--variant", "lightgcn",
                             "--out", str(out)])
    empty = CliRunner().invoke(cli, ["recommend", "--bundle", str(out), "--profile", " "])
    assert empty.exit_code != 0 and "--profile is empty" in empty.output
    for k in ("0", "-5"):
        bad = CliRunner().invoke(cli, ["recommend", "--bundle", str(out), "--user", "1", "-k", k])
        assert bad.exit_code == 2 and "-k" in bad.output


def _prepare(root: str) -> str:
    from dataHandler import prepare_dataset

    return str(prepare_dataset("demo", root))


def test_concurrent_first_preparations_do_not_race(tmp_path):
    import multiprocessing

    leftover = tmp_path / ".demo.abc.tmp"  # what a killed preparation leaves behind
    leftover.mkdir()
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        folders = pool.map(_prepare, [str(tmp_path)] * 3)
    assert set(folders) == {str(tmp_path / "demo")}
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_a_folder_without_split_files_says_what_is_expected(tmp_path):
    from dataHandler import DataError, prepare_dataset

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.csv").write_text("user,item\n0,0\n")
    with pytest.raises(DataError, match=r"val\.csv, test\.csv are missing \(found train\.csv\)"):
        prepare_dataset(str(tmp_path / "mine"))
    (tmp_path / "mine" / "train.csv").unlink()
    with pytest.raises(DataError, match="no interaction files found; expected"):
        prepare_dataset(str(tmp_path / "mine"))


def test_a_terminated_process_leaves_no_staging_folder(tmp_path):
    import signal
    import subprocess
    import sys

    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils import atomic_path\n"
              "with atomic_path(sys.argv[2]) as staged:\n"
              "    staged.mkdir(); (staged / 'half.txt').write_text('x')\n"
              "    print('staged', flush=True); time.sleep(60)\n")
    target = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parents[1]),
                                str(target)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "staged"
    assert [p.name for p in tmp_path.iterdir()][0].endswith(".tmp")  # staging under way
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder
