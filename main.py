"""Command-line entry point: wires data, models, retrieval and evaluation together."""
from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "0" if os.environ.get("RECSYS_ONLINE") else "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402
import numpy as np  # noqa: E402

from dataHandler import DataError, load_dataset, prepare_dataset  # noqa: E402
from evaluation import (format_table, per_user_metrics, segment_metrics,  # noqa: E402
                        summarise, users_with_test_items, write_run)
from parser import RECALL_VARIANTS, data_options, encoder_options, run_options  # noqa: E402
from utils import log, peak_memory_mb, pick_device, set_seed, timed  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Text-rich two-stage recommender: shrunken encoder, FAISS recall, Recall/NDCG."""


def build_encoder(opts: dict):
    from model import TextEncoder

    device = pick_device(opts["device"])
    settings = dict(pooling=opts["pooling"], max_length=opts["max_length"],
                    batch_size=opts["batch_size"], quantize=opts["quantize"], device=device)
    if opts.get("encoder_path"):
        return TextEncoder.from_pretrained(opts["encoder_path"], **settings)
    return TextEncoder.from_pretrained(opts["base_model"], layers=opts["layers"],
                                       strategy=opts["layer_strategy"], **settings)


def load_data(opts: dict):
    folder = prepare_dataset(opts["dataset"], opts["data_root"], opts["data_source"],
                             opts["data_url"], opts.get("seed", 2023))
    return load_dataset(folder, Path(opts["dataset"]).name)


def run_popularity(dataset, users: np.ndarray, opts: dict) -> tuple[dict, np.ndarray, dict]:
    from model import Popularity

    top = Popularity().fit(dataset).recommend(users, max(opts["ks"]), dataset.train)
    return {}, top, {}


def run_text(dataset, users: np.ndarray, opts: dict) -> tuple[dict, np.ndarray, dict]:
    from model import FaissRetriever, TextRecall

    coverage = dataset.text_coverage()
    if coverage["items"]["written"] + coverage["items"]["built"] == 0:
        raise VariantUnavailable("no item profiles in this data (add item_profile.json or "
                                 "item_meta.json to the data folder)")
    encoder = build_encoder(opts)
    started = time.perf_counter()
    recall = TextRecall(encoder, opts["cache_dir"], opts["user_text"]).fit(dataset)
    encode_seconds = time.perf_counter() - started
    user_vectors, item_vectors = recall.embeddings()
    retriever = FaissRetriever(opts["index"], nprobe=opts["nprobe"])
    retriever.fit(item_vectors, np.flatnonzero(recall.item_has_text))
    top, _ = retriever.search(user_vectors, max(opts["ks"]), dataset.train, users)
    top[recall.user_kind[users] == "none"] = -1  # no text and no history: nothing to score
    info = {"encoder": encoder.describe(), "encode_seconds": round(encode_seconds, 2),
            "index": opts["index"], "device": encoder.device,
            "items_without_text_excluded": int((~recall.item_has_text).sum()),
            "test_users_by_user_vector": {k: int(v) for k, v in zip(
                *np.unique(recall.user_kind[users], return_counts=True))}}
    return info, top, {"user_vector": recall.user_kind}


class VariantUnavailable(Exception):
    """The data does not allow this variant; the message says why."""


RUNNERS = {"popularity": run_popularity, "text": run_text}


def run_experiment(opts: dict) -> Path:
    set_seed(opts["seed"])
    if opts.get("threads"):
        import torch
        torch.set_num_threads(opts["threads"])
    dataset = load_data(opts)
    summary = dataset.summary()
    users = users_with_test_items(dataset.test)
    log(f"{summary['dataset']}: {summary['users']:,} users, {summary['items']:,} items, "
        f"{summary['test_users']:,} test users; text coverage {summary['text_coverage']}")
    variants = RECALL_VARIANTS if opts["variants"] == "all" else (opts["variants"],)
    results, per_user = {}, {}
    for variant in variants:
        log(f"== {variant}")
        try:
            with timed() as clock:
                info, top, labels = RUNNERS[variant](dataset, users, opts)
        except VariantUnavailable as reason:
            log(f"{variant}: unavailable: {reason}")
            results[variant] = {"status": "unavailable", "reason": str(reason)}
            continue
        frame = per_user_metrics(top, users, dataset.test, opts["ks"])
        per_user[variant] = frame
        results[variant] = {"status": "ok", "metrics": summarise(frame, opts["ks"]),
                            "seconds": round(clock["seconds"], 2),
                            "peak_memory_mb": round(peak_memory_mb(), 1), **info,
                            "segments": {name: segment_metrics(frame, values, opts["ks"])
                                         for name, values in labels.items()}}
    notes = _protocol_notes(dataset)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = write_run(Path(opts["runs_dir"]) / summary["dataset"] / stamp,
                        {**opts, "command": " ".join(sys.argv)}, summary, results, per_user,
                        notes)
    print(format_table(results, opts["ks"]))
    print(f"\nrun written to {run_dir}")
    return run_dir


def _protocol_notes(dataset) -> list[str]:
    repeats = dataset.test.multiply(dataset.train).nnz
    notes = ["Peak MB is the process's peak resident memory up to the end of that variant."]
    if repeats:
        notes.append(f"{repeats:,} test pairs also occur in training; with training items "
                     "excluded from ranking they cannot be hit (standard protocol).")
    return notes


@cli.command()
@data_options
@encoder_options
@run_options
def run(**opts) -> None:
    """Prepare data, encode profiles, retrieve, evaluate; write runs/DATASET/TIMESTAMP/."""
    try:
        run_experiment(opts)
    except DataError as error:
        raise click.ClickException(str(error))


@cli.command()
@data_options
@click.option("--seed", default=2023, show_default=True, type=int)
def prepare(**opts) -> None:
    """Fill dataset/NAME (copy, download or generate) and write built profiles."""
    try:
        dataset = load_data(opts)
    except DataError as error:
        raise click.ClickException(str(error))
    click.echo(dataset.summary())


@cli.command()
@encoder_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to save the shrunken encoder in (save_pretrained format).")
def shrink(out: str, **opts) -> None:
    """Shrink the base encoder (keep --layers layers) and save it for reuse via --encoder."""
    encoder = build_encoder({**opts, "quantize": False})
    encoder.save(out)
    click.echo(f"saved {encoder.describe()} to {out}")


@cli.command()
@data_options
@encoder_options
@click.option("--profiles", default=2048, show_default=True,
              help="How many item profiles to encode per encoder setting.")
@click.option("--with-recall", is_flag=True,
              help="Also measure text-only Recall@20 of each encoder setting (encodes all).")
@click.option("--cache-dir", default=".cache/embeddings", show_default=True)
@click.option("--threads", default=None, type=int)
def bench(**opts) -> None:
    """Print encoder throughput, FAISS queries/s and peak memory on this machine."""
    from bench import run_benchmarks

    if opts.get("threads"):
        import torch
        torch.set_num_threads(opts["threads"])
    try:
        run_benchmarks(opts)
    except DataError as error:
        raise click.ClickException(str(error))


if __name__ == "__main__":
    cli()
