"""Command-line entry point: declares the commands and calls the library."""
from __future__ import annotations

import functools
import json
import os
import textwrap
from datetime import datetime
from dataclasses import fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "0" if os.environ.get("RECSYS_ONLINE") else "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402

from bench import run_benchmarks  # noqa: E402
from bench.compression import run_compression  # noqa: E402
from bench.scale import run_scale  # noqa: E402
from dataHandler import DataError, prepare_dataset  # noqa: E402
from evaluation import (ABError, Evaluator, ab_compare, render_ab_markdown,  # noqa: E402
                        write_ab_report)
from model.base import ModelError  # noqa: E402
from model.bundle import Bundle, BundleError, export_bundle, reproduction_verdict  # noqa: E402
from model.config import ConfigError, ExperimentConfig  # noqa: E402
from model.ddp import data_parallel_check, run_on_ray  # noqa: E402
from model.llm_profiles import LLMConfig, describe_report, write_llm_profiles  # noqa: E402
from model.pipeline import RecallModels, build_encoder, load_data, run_experiment  # noqa: E402
from model.service import serve as serve_bundle  # noqa: E402
from model.stream import (STREAM_MODELS, STREAM_OPTIONS, Stream,  # noqa: E402
                          render_stream_report, write_stream_report)
from model.synth import write_synthetic  # noqa: E402
from model.update import update_bundle  # noqa: E402
from model.versions import BundleStore, VersionError  # noqa: E402
from parser import _int_list, config_options, experiment_config  # noqa: E402
from utils import OutputExists, atomic_path  # noqa: E402

USER_ERRORS = (DataError, BundleError, ConfigError, ModelError, FileNotFoundError, OutputExists)


def clear_errors(*more: type[Exception]):
    """The library's errors about the user's input become one-line CLI errors."""
    def decorate(command):
        @functools.wraps(command)
        def wrapped(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except (*USER_ERRORS, ABError, *more) as error:
                raise click.ClickException(str(error))
        return wrapped
    return decorate


OVERWRITE = click.option("--overwrite", is_flag=True,
                         help="Replace --out if it holds an earlier output of this tool (a "
                              "folder it did not write is never replaced).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Text-rich two-stage recommender: shrunken encoder, graph signals, FAISS recall,
    Wide&Deep ranking, Recall/NDCG under the full-ranking protocol."""


def _run_config(run_dir: str) -> ExperimentConfig:
    return ExperimentConfig.load(Path(run_dir) / "config.json")


@cli.command()
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Run from a YAML or JSON config (e.g. a run's config.json to rerun it); "
                   "flags given here override it.")
@config_options("data", "encoder", "run", "graph", "rank", "finetune")
@click.pass_context
@clear_errors()
def run(ctx: click.Context, config_file: str | None, **values) -> None:
    """Prepare data, fit every variant, retrieve, rank, evaluate; write runs/DATASET/STAMP/."""
    run_experiment(experiment_config(ctx, config_file, values))


@cli.command()
@config_options("data")
@config_options("run", only=("seed",))
@click.pass_context
@clear_errors()
def prepare(ctx: click.Context, **values) -> None:
    """Fill dataset/NAME (copy, download or generate) and write built profiles."""
    click.echo(load_data(experiment_config(ctx, None, values)).summary())


@cli.command()
@config_options("data")
@config_options("run", only=("seed",))
@click.option("--users", "target", flag_value="users", default=True,
              help="Write user profiles (from their training items only) [default].")
@click.option("--items", "target", flag_value="items",
              help="Write item profiles (from item_meta.json and --reviews).")
@config_options(LLMConfig)
@click.pass_context
@clear_errors()
def profiles(ctx: click.Context, target: str, **values) -> None:
    """Write missing user or item profiles with an LLM (OpenAI-compatible API) into the data
    folder's user_profile.json / item_profile.json; resumable, with a token and cost report."""
    llm = LLMConfig(**{f.name: values.pop(f.name) for f in fields(LLMConfig)})
    config = experiment_config(ctx, None, values)
    folder = prepare_dataset(config.data.dataset, config.data.data_root, config.data.data_source,
                             config.data.data_url, config.run.seed)
    click.echo(describe_report(write_llm_profiles(load_data(config), folder, target, llm)))


@cli.command()
@click.option("--users", required=True, type=click.IntRange(1))
@click.option("--items", required=True, type=click.IntRange(1))
@click.option("--interactions", required=True, type=click.IntRange(1))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the data set (CSV layout; use it with --dataset FOLDER).")
@click.option("--seed", default=0, show_default=True, type=int)
@OVERWRITE
@clear_errors()
def synth(users: int, items: int, interactions: int, out: str, seed: int,
          overwrite: bool) -> None:
    """Generate a labelled SYNTHETIC data set (power-law degrees, topics, templated
    profiles) for scale measurements only."""
    click.echo(json.dumps(write_synthetic(Path(out), users, items, interactions, seed,
                                          overwrite)))


@cli.command()
@config_options("encoder")
@config_options("run", only=("device",))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to save the shrunken encoder in (save_pretrained format).")
@OVERWRITE
@click.pass_context
@clear_errors(ValueError)  # e.g. a prompt-tuned encoder cannot be shrunk
def shrink(ctx: click.Context, out: str, overwrite: bool, **values) -> None:
    """Shrink the base encoder (keep --layers layers) and save it for reuse via --encoder."""
    encoder = build_encoder(experiment_config(ctx, None, values), quantize=False)
    encoder.save(out, overwrite)
    click.echo(f"saved {encoder.describe()} to {out}")


@cli.command()
@config_options("data", "encoder")
@config_options("run", only=("cache_dir", "threads", "device", "engine", "workers",
                             "ray_address", "nprobe", "seed"))
@click.option("--profiles", default=2048, show_default=True,
              help="How many item profiles to encode per encoder setting.")
@click.option("--with-recall", is_flag=True,
              help="Also measure text-only Recall@20 of each encoder setting (encodes all).")
@click.option("--compression", is_flag=True, help="Instead: the teacher / shrunk / distilled "
              "encoder table (fp32 and int8) on the cold-items and warm splits.")
@click.option("--distilled", default=None, type=click.Path(exists=True, file_okay=False),
              help="With --compression: a distilled encoder folder (a run's "
              "models/text_distilled/encoder).")
@click.option("--mpnet", is_flag=True, help="With --compression: add mpnet 12 -> 6 and 12 -> 3.")
@click.option("--scale", is_flag=True, help="Instead: time and memory (driver and each worker) "
              "of load, text encoding, ALS, retrieval and evaluation on --dataset (e.g. a "
              "`synth` folder) with --engine/--workers; appends to runs/scale/results.jsonl and "
              "prints every result so far, the growth with size and a labelled projection.")
@click.pass_context
@clear_errors()
def bench(ctx: click.Context, profiles: int, with_recall: bool, compression: bool,
          distilled: str | None, mpnet: bool, scale: bool, **values) -> None:
    """Print encoder throughput, FAISS queries/s and peak memory on this machine."""
    config = experiment_config(ctx, None, values)
    if scale:
        run_scale(config)
    elif compression:
        run_compression(config, distilled, mpnet, profiles)
    else:
        run_benchmarks(config, profiles, with_recall)


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder (runs/DATASET/STAMP).")
@click.option("--variant", default="fused", show_default=True,
              help="Which variant's model to export (text, deepwalk, graphsage, lightgcn, "
                   "fused, ...); its Wide&Deep ranker comes along when the run trained one.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bundle store: created, or given a new version that becomes current.")
@click.option("--format", "storage", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "int8"]),
              help="Storage of the embedding matrices.")
@click.option("--index", default="flat", show_default=True,
              type=click.Choice(["flat", "ivf", "hnsw"]),
              help="Item index: exact, or HNSW / IVF whose search width is doubled until its "
              "top 20 keeps 95% of the exact top 20 of 2,000 sampled users (else exact).")
@OVERWRITE
@clear_errors()
def export(run_dir: str, variant: str, out: str, storage: str, index: str,
           overwrite: bool) -> None:
    """Export a run's model, FAISS index, id maps, ranker and manifest as a bundle."""
    version = export_bundle(Path(run_dir), variant, load_data(_run_config(run_dir)), Path(out),
                            storage, overwrite, index)
    click.echo(f"bundle version {version} written to {out} (now current)")


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False))
@click.option("--user", default=None, help="Known user id: their top items, seen items excluded.")
@click.option("--profile", default=None, help="Profile text of a new (cold-start) user.")
@click.option("--similar-items", "item", default=None, help="Item id: the most similar items.")
@click.option("--lookalike", default=None, help="User id: the most similar users.")
@click.option("--rank/--no-rank", default=False, show_default=True,
              help="Re-order --user's recall candidates with the bundle's Wide&Deep ranker.")
@click.option("--recent-items", default=None,
              help="Comma-separated items --user just interacted with: folded into their "
                   "vector on the fly (near-online, no training).")
@click.option("--where", multiple=True, metavar="NAME=VALUE",
              help="Only items with this attribute (city, state, categories where the data "
                   "has them), for --user; repeatable.")
@click.option("-k", "k", default=20, show_default=True, type=click.IntRange(1, 10000))
@clear_errors()
def recommend(bundle_dir: str, user: str | None, profile: str | None, item: str | None,
              lookalike: str | None, rank: bool, recent_items: str | None, where: tuple,
              k: int) -> None:
    """Answer from a bundle alone: recommendations, similar items, look-alike users."""
    asked = [q for q in (user, profile, item, lookalike) if q is not None]
    if len(asked) != 1:
        raise click.UsageError("give exactly one of --user, --profile, --similar-items, "
                               "--lookalike")
    if (rank or recent_items) and user is None:
        raise click.UsageError("--rank and --recent-items apply to a known --user")
    if rank and recent_items:
        raise click.UsageError("--recent-items folds into the recall vector; use it without "
                               "--rank")
    bundle = Bundle(bundle_dir)
    recent = [i.strip() for i in recent_items.split(",") if i.strip()] if recent_items else None
    if where and (user is None or recent):
        raise click.UsageError("--where applies to --user recommendations")
    filters = dict(w.split("=", 1) for w in where if "=" in w.strip("="))
    if len(filters) != len(where):
        raise click.UsageError("--where takes NAME=VALUE (each NAME once), e.g. "
                               "--where city=Tucson")
    rows, kind = (bundle.recommend(user, k, rank, filters), "item") if filters else \
        bundle.answer(user, profile, item, lookalike, k, rank, recent)
    described = kind == "item" and bundle.item_profiles is not None
    click.echo(f"rank\t{kind}\tscore" + ("\tprofile" if described else ""))
    for position, (identifier, score) in enumerate(rows, start=1):
        text = "\t" + textwrap.shorten(bundle.item_profile(identifier), 100) if described else ""
        click.echo(f"{position}\t{identifier}\t{score:.4f}{text}")


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
              help="Bundle store (from `export`); the update becomes a new version.")
@click.option("--interactions", required=True, type=click.Path(dir_okay=False),
              help="CSV 'user,item[,timestamp]' with original ids; unknown ids are new.")
@click.option("--user-profiles", default=None, type=click.Path(dir_okay=False),
              help="JSON lines {\"user_id\": id, \"profile\": text} of new users.")
@click.option("--item-profiles", default=None, type=click.Path(dir_okay=False),
              help="JSON lines {\"item_id\": id, \"profile\": text} of new items.")
@click.option("--remove-items", default=None, type=click.Path(dir_okay=False),
              help="Item ids (one per line) to take out of the index.")
@click.option("--validation", default=None, type=click.Path(dir_okay=False),
              help="Held-out 'user,item' CSV: not made current if Recall@20 falls more than "
                   "--max-drop below; decides if ranker/GraphSAGE training is kept.")
@click.option("--max-drop", default=0.02, show_default=True, type=click.FloatRange(0, 1))
@clear_errors()
def update(bundle_dir: str, interactions: str, user_profiles: str | None,
           item_profiles: str | None, remove_items: str | None, validation: str | None,
           max_drop: float) -> None:
    """Daily update without retraining: fold new interactions, users and items into a new
    version of the bundle (made current unless validation says it got worse)."""
    result = update_bundle(Path(bundle_dir), Path(interactions), user_profiles, item_profiles,
                           remove_items, validation, max_drop)
    click.echo(json.dumps(result.report, indent=1))
    click.echo(f"version {result.version} written; " + (
        "now current" if result.made_current else
        f"NOT made current, so its interactions are not served: check them, then `versions "
        f"--bundle {bundle_dir} --rollback {result.version}` makes it current"))


@cli.command()
@config_options("data")
@config_options("run", "graph", only=STREAM_OPTIONS)
@click.option("--model", "variant", default="als", show_default=True,
              type=click.Choice(STREAM_MODELS), help="Recall model replayed.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(1, 100),
              help="Increments after the base.")
@click.pass_context
@clear_errors()
def stream(ctx: click.Context, variant: str, steps: int, **values) -> None:
    """Replay a data set as a stream: base model, then STEPS daily updates, each compared
    with a full retrain on the same data (parity, freshness, cost); writes a report."""
    config = experiment_config(ctx, None, values)
    dataset, data = load_data(config), config.data
    folder = prepare_dataset(data.dataset, data.data_root, data.data_source, data.data_url,
                             config.run.seed)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(config.run.runs_dir) / dataset.name / f"stream-{stamp}"
    with atomic_path(out) as staging:
        staging.mkdir(parents=True)
        report = Stream(dataset, lambda part: RecallModels(part, config), variant, steps,
                        staging, config.run.seed, folder).run()
        write_stream_report(report, staging)
    click.echo(render_stream_report(report))
    click.echo(f"stream report written to {out}/stream.md (bundle store: {out}/bundle)")


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False))
@click.option("--rollback", "rollback_to", is_flag=False, flag_value="parent", default=None,
              help="Make the current version's parent (or the version given) current.")
@clear_errors(VersionError)
def versions(bundle_dir: str, rollback_to: str | None) -> None:
    """List a bundle store's versions (the current one marked); --rollback switches back."""
    store = BundleStore(bundle_dir)
    if rollback_to:
        target = store.rollback(None if rollback_to == "parent" else rollback_to, Bundle)
        click.echo(f"current version is now {target}")
    click.echo("version\tcurrent\tparent\tkind\tusers\titems\tcreated")
    for row in store.history():
        click.echo("\t".join(str(row[k]) for k in ("version", "current", "parent", "kind",
                                                    "users", "items", "created")))


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--admin-token", default=None, envvar="RECSYS_ADMIN_TOKEN",
              help="Enables POST /admin/reload (hot swap) for this bearer token.")
@click.option("--watch-seconds", default=2.0, show_default=True, type=click.FloatRange(0),
              help="How often the store's `current` version is checked and swapped in when "
                   "it changed (0: only on /admin/reload).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="Threads per request for FAISS and the ranker (0: the libraries' default).")
@clear_errors()
def serve(bundle_dir: str, host: str, port: int, admin_token: str | None,
          watch_seconds: float, threads: int) -> None:
    """Serve a bundle over HTTP: recommendations, similar items, look-alikes, /metrics."""
    serve_bundle(bundle_dir, host, port, admin_token, watch_seconds, threads)


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False))
@click.option("--ks", default="5,10,20,50", show_default=True, callback=_int_list)
@click.option("--tolerance", default=1e-4, show_default=True, type=float,
              help="Largest difference from the metrics at export still called reproduced.")
@clear_errors()
def evaluate(bundle_dir: str, ks: list[int], tolerance: float) -> None:
    """Re-evaluate a bundle's recall on its data set's test split; exits 1 when the metrics
    differ from those at export by more than --tolerance."""
    bundle = Bundle(bundle_dir)
    now, then = bundle.evaluate(load_data(bundle.data_config()), tuple(ks))
    click.echo("| metric | bundle now | at export |\n|---|---|---|")
    for name, value in now.items():
        click.echo(f"| {name} | {value:.4f} | {then.get(name, float('nan')):.4f} |")
    reproduced, verdict = reproduction_verdict(now, then, tolerance)
    click.echo(verdict)
    if not reproduced:
        raise SystemExit(1)


@cli.command()
@click.option("--a", "run_a", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder of the baseline (A).")
@click.option("--b", "run_b", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder of the treatment (B); may be the same folder as A.")
@click.option("--a-variant", default=None, help="Variant of run A [default: its last row].")
@click.option("--b-variant", default=None, help="Variant of run B [default: its last row].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for report.md, report.html, ab.json and the plots.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@OVERWRITE
@clear_errors()
def ab(run_a: str, run_b: str, a_variant: str | None, b_variant: str | None, out: str,
       seed: int, overwrite: bool) -> None:
    """Offline A/B report of two runs on the same data and split (per-user metrics)."""
    evaluator = Evaluator.on_test(load_data(_run_config(run_a)))
    report = ab_compare(Path(run_a), Path(run_b), a_variant, b_variant, evaluator, seed)
    write_ab_report(report, Path(out), overwrite)
    click.echo(render_ab_markdown(report))
    click.echo(f"report written to {out}/report.html")


@cli.command("ddp-check")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: this process, or the ranks torchrun started; "
              "ray: a Ray Train TorchTrainer with --workers workers.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=5, show_default=True, type=click.IntRange(1))
@click.option("--global-batch", default=512, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@clear_errors(ValueError)  # a global batch that does not split over the workers
def ddp_check(engine: str, workers: int, **config) -> None:
    """Data-parallel Wide&Deep training equals one process at the same global batch:
    prints the largest gradient and weight differences (JSON). Under torchrun:
    `torchrun --nproc_per_node=2 main.py ddp-check`."""
    report = run_on_ray(config, workers) if engine == "ray" else data_parallel_check(config)
    if report:  # rank 0
        click.echo(json.dumps(report))


if __name__ == "__main__":
    cli()
