"""Probe the CLI with ~30 bad or edge-case inputs, as a user would type them, and print a
markdown table of how each one ended: a clear one-line error, a traceback, or success.

Every input goes through `click.testing.CliRunner` in-process (`from main import cli`); all
files (data, runs, cache, bundles, reports) go under a fresh temporary folder (removed at the
end unless --keep), never in the repository or the current directory. Setup makes one tiny
demo run (LightGCN, 2 epochs), a second demo run on another seed (popularity only), a bundle
of the first, and a tiny RoBERTa built offline. Every `run` probe also gets `--model
popularity --data-root/--runs-dir/--cache-dir TMP/... --threads 1` (cheap; the table shows
only the input under test), and any probe still running after TIME_LIMIT s is stopped.

    .venv/bin/python -m bench.probe_inputs [--out FILE.md] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # another benchmark may share the machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from main import cli  # noqa: E402
from model.text import build_tiny_roberta  # noqa: E402

TIME_LIMIT = 120  # seconds per probe; a probe still running then is stopped
THESIS = "years of work"  # the user's file in a folder the tool did not create


class ProbeTimeout(Exception):
    """Raised by SIGALRM inside a probe that would run (train) for too long."""


class _Payload(str):
    """Pickles to a call of os.system(self): loading it with plain pickle runs a command."""

    def __reduce__(self):
        return (os.system, (str(self),))


def invoke(args: list[str], limit: int = TIME_LIMIT):
    def stop(signum, frame):
        raise ProbeTimeout(f"still running after {limit}s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(limit)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _short(text: str, tmp: Path, width: int = 100) -> str:
    text = " ".join(text.replace(str(tmp), "TMP").split())
    return text if len(text) <= width else text[:width - 3] + "..."


def classify(result, tmp: Path) -> tuple[str, str]:
    """(kind, text) with kind one of 'clear error', 'TRACEBACK', 'ok'."""
    error = result.exception
    if isinstance(error, ProbeTimeout):
        return "ok", f"accepted; {error} (stopped by the probe)"
    if error is not None and not isinstance(error, SystemExit):
        return "TRACEBACK", type(error).__name__
    lines = [l for l in result.output.splitlines() if l.strip()]
    if result.exit_code == 0:
        return "ok", _short(lines[-1] if lines else "(no output)", tmp)
    errors = [l[len("Error:"):] for l in lines if l.startswith("Error:")]
    return "clear error", _short((errors or lines[-1:] or ["(no output)"])[0], tmp)


def write_easyrec(folder: Path, train, val, test) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, dense in (("trn_mat.pkl", train), ("val_mat.pkl", val), ("tst_mat.pkl", test)):
        with open(folder / name, "wb") as handle:
            pickle.dump(sp.csr_matrix(np.asarray(dense, dtype=np.float32)), handle)
    return folder


def write_csv(folder: Path, train: str, val: str = "0,1\n", test: str = "1,0\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("val.csv", val), ("test.csv", test)):
        (folder / name).write_text("user,item\n" + rows)
    return folder


def csv_with_profiles(folder: Path, item_profile: bytes, user_profile: bytes = b"") -> Path:
    write_csv(folder, "0,0\n0,1\n1,1\n1,2\n")
    (folder / "item_profile.json").write_bytes(item_profile)
    if user_profile:
        (folder / "user_profile.json").write_bytes(user_profile)
    return folder


def crafted_pickle(folder: Path, marker: Path) -> Path:
    write_easyrec(folder, np.eye(3), np.eye(3), np.eye(3))
    with open(folder / "trn_mat.pkl", "wb") as handle:
        pickle.dump([_Payload(f"touch {marker}"), sp.csr_matrix(np.eye(3))], handle)
    return folder


def tiny_roberta(folder: Path) -> Path:
    corpus = ["Thai food and cozy cafes.", "Sports bars and basketball.", "A quiet bakery."]
    return build_tiny_roberta(folder, corpus)


def run_dirs_args(tmp: Path) -> list[str]:
    return ["--data-root", tmp / "data", "--runs-dir", tmp / "runs", "--cache-dir",
            tmp / "cache", "--threads", "1"]


def setup(tmp: Path) -> dict:
    """Two demo runs (seeds 2023 and 2024), a bundle of the first, a tiny RoBERTa."""
    def made(args: list, prefix: str) -> str:
        result = invoke(args, limit=300)
        found = [l for l in result.output.splitlines() if l.startswith(prefix)]
        if result.exit_code != 0 or not found:
            sys.exit(f"setup failed: {args}\n{result.output}\n{result.exception!r}")
        return found[-1][len(prefix):].strip()

    print("setup: demo runs, bundle, tiny RoBERTa ...", file=sys.stderr)
    run_a = made(["run", "--dataset", "demo", "--model", "lightgcn", "--epochs", 2,
                  "--dw-epochs", 1, "--rank", "none", *run_dirs_args(tmp)], "run written to ")
    run_b = made(["run", "--dataset", "demo", "--model", "popularity", "--seed", 2024,
                  *run_dirs_args(tmp)], "run written to ")
    made(["export", "--run", run_a, "--variant", "lightgcn", "--out", tmp / "bundle"],
         "bundle version ")
    return {"run_a": run_a, "run_b": run_b, "bundle": tmp / "bundle",
            "roberta": tiny_roberta(tmp / "tiny-roberta")}


def edited_bundle(ctx: dict, tmp: Path) -> Path:
    copy = tmp / "bundle-edited"
    shutil.copytree(ctx["bundle"] / "current", copy)  # the current version, as a folder
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["metrics_at_export"]["recall@20"] += 0.05
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def a_file(path: Path, text: str) -> Path:
    """Write `path`, making its folder; return the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def probes(tmp: Path, ctx: dict) -> list[tuple[str, callable]]:
    """(shown input, function returning the CLI arguments) in the brief's order."""
    d = run_dirs_args(tmp)
    cheap = ["--model", "popularity", *d]

    def run_on(folder_fn):
        return lambda: ["run", "--dataset", folder_fn(), *cheap]
    bundle, rec = ctx["bundle"], ["recommend", "--bundle", ctx["bundle"]]
    bad = b'{"item_id": 0, "profile": "ok"}\n{"item_id": 1, "profile": \n'
    latin = b'{"item_id": 0, "profile": "caf\xe9"}\n'
    far = b'{"item_id": 0, "profile": "ok"}\n'
    user99 = b'{"user_id": 99, "profile": "x"}\n'
    export = ["export", "--run", ctx["run_a"], "--variant", "lightgcn"]
    shrink = ["shrink", "--base-model", ctx["roberta"], "--device", "cpu"]
    return [
        ("run --dataset path/that/does/not/exist", run_on(lambda: "path/that/does/not/exist")),
        ("run --dataset <folder without split files>",
         run_on(lambda: a_file(tmp / "empty" / "notes.txt", "").parent)),
        ("run --dataset <CSV, malformed JSON line in item_profile.json>",
         run_on(lambda: csv_with_profiles(tmp / "badjson", bad))),
        ("run --dataset <CSV, non-UTF-8 byte in item_profile.json>",
         run_on(lambda: csv_with_profiles(tmp / "latin1", latin))),
        ("run --dataset <CSV, user_profile.json user_id 99 of 2 users>",
         run_on(lambda: csv_with_profiles(tmp / "range", far, user99))),
        ("run --dataset <trn_mat.pkl that runs os.system on load>",
         run_on(lambda: crafted_pickle(tmp / "pickle", tmp / "PWNED"))),
        ("run --dataset <EasyRec, all three splits empty (3x3 zeros)>",
         run_on(lambda: write_easyrec(tmp / "zeros", *[np.zeros((3, 3))] * 3))),
        ("run --dataset <CSV, user id 3000000000 in train.csv>",
         run_on(lambda: write_csv(tmp / "huge", "0,0\n3000000000,1\n"))),
        ("run --dataset <CSV, item id written 2e1>",
         run_on(lambda: write_csv(tmp / "sci", "0,0\n1,2e1\n"))),
        ("run --dataset demo --ks 7", lambda: ["run", "--ks", "7", *cheap]),
        ("run --dataset demo --ks 0", lambda: ["run", "--ks", "0", *cheap]),
        ("run --dataset demo --device cuda (no GPU)",
         lambda: ["run", "--device", "cuda", *cheap, "--runs-dir", tmp / "runs-cuda"]),
        ("run --model nonsense", lambda: ["run", *d, "--model", "nonsense"]),
        ("run --seeds 0", lambda: ["run", "--seeds", "0", *cheap]),
        ("run --config missing.yaml", lambda: ["run", "--config", tmp / "missing.yaml", *cheap]),
        ("run --config <yaml with unknown key 'epochz: 3'>",
         lambda: ["run", "--config", a_file(tmp / "unknown.yaml", "epochz: 3\n"), *cheap]),
        ("run --config <malformed yaml>",
         lambda: ["run", "--config", a_file(tmp / "bad.yaml", "model: [lightgcn\n"), *cheap]),
        ("export --out <user's non-empty folder>",
         lambda: [*export, "--out", a_file(tmp / "my-folder" / "thesis.tex", THESIS).parent]),
        ("export --out <earlier bundle> (no --overwrite)", lambda: [*export, "--out", bundle]),
        ("recommend --user 1 -k 0", lambda: [*rec, "--user", "1", "-k", "0"]),
        ("recommend --user 1 -k -1", lambda: [*rec, "--user", "1", "-k", "-1"]),
        ('recommend --profile ""', lambda: [*rec, "--profile", ""]),
        ("recommend --user nobody-42", lambda: [*rec, "--user", "nobody-42"]),
        ("recommend --bundle <folder that is not a bundle> --user 1",
         lambda: ["recommend", "--bundle", a_file(tmp / "not-a-bundle" / "notes.txt", "hi").parent,
                  "--user", "1"]),
        ("evaluate --bundle <manifest.json metrics edited>",
         lambda: ["evaluate", "--bundle", edited_bundle(ctx, tmp)]),
        ("ab --a <run seed 2023> --b <run seed 2024>",
         lambda: ["ab", "--a", ctx["run_a"], "--b", ctx["run_b"], "--out", tmp / "ab"]),
        ("shrink --base-model <tiny RoBERTa> --layers 0",
         lambda: [*shrink, "--layers", "0", "--out", tmp / "shrunk0"]),
        ("shrink --base-model <tiny RoBERTa> --layers 99",
         lambda: [*shrink, "--layers", "99", "--out", tmp / "shrunk99"]),
        ("run --tune-budget -5", lambda: ["run", "--tune-budget", "-5", *cheap]),
        ("run --rank widedeep --rank-on lightgcn --candidates 0 (--epochs 2 --rank-epochs 1)",
         lambda: ["run", "--rank", "widedeep", "--rank-on", "lightgcn", "--candidates", "0",
                  "--epochs", "2", "--rank-epochs", "1", *cheap]),
    ]


def side_checks(tmp: Path) -> list[str]:
    thesis = tmp / "my-folder" / "thesis.tex"
    intact = thesis.exists() and thesis.read_text() == THESIS
    return [f"crafted pickle: side-effect file created: {(tmp / 'PWNED').exists()}",
            f"export into user's folder: thesis.tex still intact: {intact}; folder holds "
            f"{sorted(os.listdir(tmp / 'my-folder'))}",
            f"--device cuda: its --runs-dir was created: {(tmp / 'runs-cuda').exists()}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Also write the report to this markdown file.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    options = parser.parse_args()
    tmp, home = Path(tempfile.mkdtemp(prefix="probe-inputs-")).resolve(), os.getcwd()
    os.chdir(tmp)  # anything written to the current directory lands in the temporary folder
    try:
        ctx = setup(tmp)
        rows, tracebacks = [], []
        for number, (label, make_args) in enumerate(probes(tmp, ctx), start=1):
            print(f"probe {number}: {label}", file=sys.stderr)
            result = invoke(make_args())
            kind, text = classify(result, tmp)
            rows.append((number, label, result.exit_code, kind, text))
            if kind == "TRACEBACK":
                lines = traceback.format_exception(result.exception)
                tracebacks.append(f"#{number} {label}:\n" + "".join(lines[-6:]).rstrip())
        report = render(rows, tracebacks, side_checks(tmp), tmp)
    finally:
        os.chdir(home)
        if not options.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report)
    if options.out:
        Path(options.out).write_text(report + "\n", encoding="utf-8")


def render(rows: list, tracebacks: list[str], checks: list[str], tmp: Path) -> str:
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| # | input | exit code | ended with |", "|---|---|---|---|"]
    lines += [f"| {n} | `{cell(label)}` | {code} | {cell(kind)}: {cell(text)} |"
              for n, label, code, kind, text in rows]
    kinds = [row[3] for row in rows]
    lines += ["", f"inputs: {len(rows)}; clear error: {kinds.count('clear error')}; "
                  f"ok: {kinds.count('ok')}; traceback: {kinds.count('TRACEBACK')}", "",
              "side checks:", *[f"- {c}" for c in checks]]
    if tracebacks:
        lines += ["", "tracebacks (last lines):", "```", *tracebacks, "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
