"""Command-line entry point: wires data, models, retrieval and evaluation together."""
from __future__ import annotations

import os
import sys
import textwrap
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "0" if os.environ.get("RECSYS_ONLINE") else "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402
import numpy as np  # noqa: E402

from dataHandler import DataError, load_dataset, prepare_dataset  # noqa: E402
from evaluation import (format_table, per_user_metrics, segment_metrics,  # noqa: E402
                        summarise, users_with_test_items, write_run)
from parser import (FT_LEARNING_RATES, RECALL_VARIANTS, _int_list, data_options,  # noqa: E402
                    encoder_options, finetune_options, graph_options, rank_options, run_options)
from utils import log, peak_memory_mb, pick_device, set_seed, timed  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Text-rich two-stage recommender: shrunken encoder, FAISS recall, Recall/NDCG."""


def build_encoder(opts: dict):
    from model import ENCODER_CONFIG, TextEncoder

    device = pick_device(opts["device"])
    settings = dict(pooling=opts["pooling"], max_length=opts["max_length"],
                    batch_size=opts["batch_size"], quantize=opts["quantize"], device=device)
    if opts.get("encoder_path"):
        if (Path(opts["encoder_path"]) / ENCODER_CONFIG).exists():
            for saved in ("pooling", "max_length"):  # the encoder was trained with these
                settings.pop(saved)
        return TextEncoder.from_pretrained(opts["encoder_path"], **settings)
    return TextEncoder.from_pretrained(opts["base_model"], layers=opts["layers"],
                                       strategy=opts["layer_strategy"], **settings)


def load_data(opts: dict):
    folder = prepare_dataset(opts["dataset"], opts["data_root"], opts["data_source"],
                             opts["data_url"], opts.get("seed", 2023))
    return load_dataset(folder, Path(opts["dataset"]).name)


class VariantUnavailable(Exception):
    """The data does not allow this variant; the message says why."""


class RunContext:
    """One run's data and options, plus the parts that several variants share (text
    vectors feed GraphSAGE and fusion; fusion reuses DeepWalk and GraphSAGE)."""

    def __init__(self, dataset, opts: dict) -> None:
        self.dataset, self.opts = dataset, opts
        self.users = users_with_test_items(dataset.test)
        self._parts: dict = {}
        self.ranking: dict = {}
        self.vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # saved with the run

    def part(self, name: str):
        if name not in self._parts:
            self._parts[name] = PART_BUILDERS[name](self)
        return self._parts[name]

    def retrieve(self, user_vectors: np.ndarray, item_vectors: np.ndarray,
                 items: np.ndarray | None = None, k: int | None = None,
                 users: np.ndarray | None = None) -> np.ndarray:
        from model import FaissRetriever

        retriever = FaissRetriever(self.opts["index"], nprobe=self.opts["nprobe"])
        top, _ = retriever.fit(item_vectors, items).search(
            user_vectors, k or max(self.opts["ks"]), self.dataset.train,
            self.users if users is None else users)
        return top


def build_text(ctx: RunContext):
    from model import TextRecall

    coverage = ctx.dataset.text_coverage()
    if coverage["items"]["written"] + coverage["items"]["built"] == 0:
        raise VariantUnavailable("no item profiles in this data (add item_profile.json or "
                                 "item_meta.json to the data folder)")
    encoder = build_encoder(ctx.opts)
    with timed() as clock:
        recall = TextRecall(encoder, ctx.opts["cache_dir"], ctx.opts["user_text"]).fit(ctx.dataset)
    recall.encode_seconds = clock["seconds"]
    return recall


def text_or_none(ctx: RunContext):
    try:
        return ctx.part("text")
    except VariantUnavailable:
        return None


def build_deepwalk(ctx: RunContext):
    from model import DeepWalk

    o = ctx.opts
    return DeepWalk(o["dim"], o["dw_walks"], o["dw_length"], o["dw_window"], o["dw_epochs"],
                    o["workers"], o["seed"]).fit(ctx.dataset)


def build_graphsage(ctx: RunContext):
    from model import GraphSAGE

    text = text_or_none(ctx)
    if text is None and not ctx.opts["sage_id_dim"]:
        raise VariantUnavailable("no text features and --sage-id-dim 0")
    user_text, item_text = text.embeddings() if text is not None else (None, None)
    return GraphSAGE(ctx.opts).fit(ctx.dataset, user_text, item_text)


def build_lightgcn(ctx: RunContext):
    from model import LightGCNRecall

    return LightGCNRecall(ctx.opts).fit(ctx.dataset)


def build_fused(ctx: RunContext):
    from model import Fusion

    names = [name for name in ctx.opts["fuse_parts"]
             if name != "text" or text_or_none(ctx) is not None]
    fusion = Fusion(ctx.opts["fusion"], ctx.opts).fit(
        ctx.dataset, {name: ctx.part(name).embeddings() for name in names})
    fusion.parts = names
    return fusion


PART_BUILDERS = {"fused": build_fused, "text": build_text, "deepwalk": build_deepwalk, "graphsage": build_graphsage,
                 "lightgcn": build_lightgcn}


def run_popularity(ctx: RunContext) -> tuple[dict, np.ndarray, dict]:
    from model import Popularity

    top = Popularity().fit(ctx.dataset).recommend(ctx.users, max(ctx.opts["ks"]),
                                                  ctx.dataset.train)
    return {}, top, {}


def run_text(ctx: RunContext) -> tuple[dict, np.ndarray, dict]:
    recall = ctx.part("text")
    user_vectors, item_vectors = recall.embeddings()
    ctx.vectors["text"] = (user_vectors, item_vectors)
    top = ctx.retrieve(user_vectors, item_vectors, np.flatnonzero(recall.item_has_text))
    top[recall.user_kind[ctx.users] == "none"] = -1  # no text and no history: nothing to score
    info = {"encoder": recall.encoder.describe(), "encoder_fingerprint": recall.encoder.fingerprint(),
            "encode_seconds": round(recall.encode_seconds, 2),
            "device": recall.encoder.device,
            "items_without_text_excluded": int((~recall.item_has_text).sum()),
            "test_users_by_user_vector": {k: int(v) for k, v in zip(
                *np.unique(recall.user_kind[ctx.users], return_counts=True))}}
    return info, top, {"user_vector": recall.user_kind}


def run_embedding_model(name: str):
    def runner(ctx: RunContext) -> tuple[dict, np.ndarray, dict]:
        model = ctx.part(name)
        ctx.vectors[name] = model.embeddings()
        return dict(model.training_log) if hasattr(model, "training_log") else {}, \
            ctx.retrieve(*model.embeddings()), {}
    return runner


def run_fused(ctx: RunContext) -> tuple[dict, np.ndarray, dict]:
    fusion = ctx.part("fused")
    ctx.vectors["fused"] = fusion.embeddings()
    return {"parts": fusion.parts, "method": ctx.opts["fusion"], **fusion.training_log}, \
        ctx.retrieve(*fusion.embeddings()), {}


def run_finetuned(ctx: RunContext, method: str) -> tuple[dict, np.ndarray, dict]:
    """Fine-tune a fresh copy of the encoder with `method`, save it, run text recall."""
    from coreMethod import finetune_encoder
    from model import TextRecall

    opts, data = ctx.opts, ctx.dataset
    if not (data.user_profile_source == "written").any():
        raise VariantUnavailable("fine-tuning needs users with written profiles")
    text_or_none(ctx)  # raises VariantUnavailable when there is no item text
    with timed() as clock:
        settings = {**opts, "ft_lr": opts["ft_lr"] or FT_LEARNING_RATES[method]}
        tuned, log_ = finetune_encoder(build_encoder({**opts, "quantize": False}), data,
                                       method, settings)
    folder = Path(opts["runs_dir"]) / data.name / "encoders" / f"{ctx.stamp}-{method}"
    tuned.save(folder)
    recall = TextRecall(tuned, opts["cache_dir"], opts["user_text"]).fit(data)
    user_vectors, item_vectors = recall.embeddings()
    ctx.vectors[f"text-{method}"] = (user_vectors, item_vectors)
    top = ctx.retrieve(user_vectors, item_vectors, np.flatnonzero(recall.item_has_text))
    top[recall.user_kind[ctx.users] == "none"] = -1
    return {"encoder_path": str(folder), "train_seconds": round(clock["seconds"], 1), **log_}, \
        top, {"user_vector": recall.user_kind}


def run_ranking(ctx: RunContext, mode: str) -> tuple[dict, np.ndarray, dict]:
    """Re-rank the recall candidates of --rank-on with a Wide&Deep ranker."""
    from coreMethod import ranking_pairs, rerank, train_ranker
    from model.ranking import RankingFeatures, WideDeep

    opts, data = ctx.opts, ctx.dataset
    recall_name = opts["rank_on"]
    signals = {recall_name: ctx.part(recall_name).embeddings()}
    if recall_name == "fused":
        signals.update({name: ctx.part(name).embeddings() for name in ctx.part("fused").parts})
    if "features" not in ctx.ranking:
        ctx.ranking["features"] = RankingFeatures(data.train, signals, recall_name,
                                                  seed=opts["seed"])
        ctx.ranking["candidates"] = ctx.retrieve(*signals[recall_name], k=opts["candidates"],
                                                 users=np.arange(data.n_users))
    features, candidates = ctx.ranking["features"], ctx.ranking["candidates"]
    rng = np.random.default_rng(opts["seed"])
    val_users = users_with_test_items(data.val)
    rng.shuffle(val_users)
    check_users = np.sort(val_users[: min(3000, len(val_users) // 2)])
    if opts["rank_positives"] == "val":
        fit_users, positives = np.sort(val_users[len(check_users):]), data.val
    else:
        fit_users, positives = np.flatnonzero(np.diff(data.train.indptr) > 0), data.train
    pairs = ranking_pairs(positives, fit_users, candidates[fit_users], opts["hard_negatives"],
                          opts["random_negatives"], rng,
                          within_candidates=opts["rank_positives"] == "val")
    import torch
    torch.manual_seed(opts["seed"])
    ranker = WideDeep(features, mode)
    log_ = train_ranker(ranker, features, pairs, check_users, candidates[check_users], data.val,
                        opts, f"ranker ({mode})")
    with timed() as clock:
        top = rerank(ranker, features, ctx.users, candidates[ctx.users])
    if log_["best_epoch"] == 0:  # no epoch beat the recall order on validation: keep it
        top = candidates[ctx.users]
    scored = len(ctx.users) * candidates.shape[1]
    return {"recall_model": recall_name, "mode": mode, "candidates": int(candidates.shape[1]),
            "positives": opts["rank_positives"], "training_pairs": int(len(pairs[-1])),
            "kept_recall_order": log_["best_epoch"] == 0,
            "candidates_scored_per_s": round(scored / clock["seconds"]), **log_}, top, {}


RUNNERS = {"popularity": run_popularity, "text": run_text,
           "deepwalk": run_embedding_model("deepwalk"),
           "graphsage": run_embedding_model("graphsage"),
           "lightgcn": run_embedding_model("lightgcn"),
           "fused": run_fused}


def run_experiment(opts: dict) -> Path:
    set_seed(opts["seed"])
    if opts.get("threads"):
        import torch
        torch.set_num_threads(opts["threads"])
    dataset = load_data(opts)
    summary = dataset.summary()
    ctx = RunContext(dataset, opts)
    ctx.stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    log(f"{summary['dataset']}: {summary['users']:,} users, {summary['items']:,} items, "
        f"{summary['test_users']:,} test users; text coverage {summary['text_coverage']}")
    variants = list(RECALL_VARIANTS if opts["variants"] == "all" else (opts["variants"],))
    runners = dict(RUNNERS)
    for offset, method in enumerate(opts.get("finetune", []), start=1):
        variants.insert(variants.index("text") + offset if "text" in variants else len(variants),
                        f"text ({method})")
        runners[f"text ({method})"] = (lambda m: lambda c: run_finetuned(c, m))(method)
    if opts.get("rank", "none") == "widedeep":
        modes = ["widedeep", "wide", "deep"] if opts["rank_ablations"] else ["widedeep"]
        names = {"widedeep": "Wide&Deep", "wide": "wide only", "deep": "deep only"}
        for mode in modes:
            row = f"{opts['rank_on']} + {names[mode]}"
            variants.append(row)
            runners[row] = (lambda m: lambda c: run_ranking(c, m))(mode)
    results, per_user, top_lists = {}, {}, {}
    for variant in variants:
        log(f"== {variant}")
        try:
            with timed() as clock:
                info, top, labels = runners[variant](ctx)
        except VariantUnavailable as reason:
            log(f"{variant}: unavailable: {reason}")
            results[variant] = {"status": "unavailable", "reason": str(reason)}
            continue
        frame = per_user_metrics(top, ctx.users, dataset.test, opts["ks"])
        if (dataset.user_profile_source == "written").any():
            labels["user_profile"] = np.where(dataset.user_profile_source == "written",
                                              "written", "not written")
        per_user[variant] = frame
        top_lists[variant] = top.astype(np.int32)
        results[variant] = {"status": "ok", "metrics": summarise(frame, opts["ks"]),
                            "seconds": round(clock["seconds"], 2),
                            "peak_memory_mb": round(peak_memory_mb(), 1), **info,
                            "segments": {name: segment_metrics(frame, values, opts["ks"])
                                         for name, values in labels.items()}}
    notes = _protocol_notes(dataset)
    run_dir = write_run(Path(opts["runs_dir"]) / summary["dataset"] / ctx.stamp,
                        {**opts, "command": " ".join(sys.argv)}, summary, results, per_user,
                        notes, top_lists, ctx.vectors)
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
@graph_options
@rank_options
@finetune_options
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


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run folder (runs/DATASET/TIMESTAMP).")
@click.option("--variant", default="fused", show_default=True,
              help="Which variant's vectors to export (text, deepwalk, graphsage, lightgcn, "
                   "fused).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bundle folder to write (replaced atomically).")
@click.option("--format", "storage", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "int8"]),
              help="Storage of the embedding matrices.")
def export(run_dir: str, variant: str, out: str, storage: str) -> None:
    """Export a run's vectors, FAISS index, id maps and manifest as a recall bundle."""
    import json

    from model.bundle import BundleError, export_bundle

    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
        export_bundle(Path(run_dir), variant, load_data(config), Path(out), storage)
    except (BundleError, DataError, FileNotFoundError, KeyError) as error:
        raise click.ClickException(str(error))
    click.echo(f"bundle written to {out}")


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False))
@click.option("--user", default=None, help="Known user id: their top items, seen items excluded.")
@click.option("--profile", default=None, help="Profile text of a new (cold-start) user.")
@click.option("--similar-items", "item", default=None, help="Item id: the most similar items.")
@click.option("--lookalike", default=None, help="User id: the most similar users.")
@click.option("-k", "k", default=20, show_default=True, type=int)
def recommend(bundle_dir: str, user: str | None, profile: str | None, item: str | None,
              lookalike: str | None, k: int) -> None:
    """Answer from a bundle alone: recommendations, similar items, look-alike users."""
    from model.bundle import Bundle, BundleError

    asked = [q for q in (user, profile, item, lookalike) if q is not None]
    if len(asked) != 1:
        raise click.UsageError("give exactly one of --user, --profile, --similar-items, "
                               "--lookalike")
    try:
        bundle = Bundle(bundle_dir)
        if user is not None:
            rows, kind = bundle.recommend(user, k), "item"
        elif profile is not None:
            rows, kind = bundle.recommend_for_vector(bundle.embed_profile(profile), k), "item"
        elif item is not None:
            rows, kind = bundle.similar_items(item, k), "item"
        else:
            rows, kind = bundle.lookalike_users(lookalike, k), "user"
    except BundleError as error:
        raise click.ClickException(str(error))
    described = kind == "item" and bundle.item_profiles is not None
    click.echo(f"rank\t{kind}\tscore" + ("\tprofile" if described else ""))
    for rank, (identifier, score) in enumerate(rows, start=1):
        text = "\t" + textwrap.shorten(bundle.item_profile(identifier), 100) if described else ""
        click.echo(f"{rank}\t{identifier}\t{score:.4f}{text}")


@cli.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False))
@click.option("--ks", default="5,10,20,50", show_default=True, callback=_int_list)
def evaluate(bundle_dir: str, ks: tuple[int, ...]) -> None:
    """Re-evaluate a bundle's recall on its data set's test split (reproducibility check)."""
    from model import FaissRetriever
    from model.bundle import Bundle, BundleError

    try:
        bundle = Bundle(bundle_dir)
        dataset = load_data({**bundle.manifest["data"], "data_url": None, "seed": 2023})
    except (BundleError, DataError) as error:
        raise click.ClickException(str(error))
    if dataset.summary() != bundle.manifest["dataset"]:
        raise click.ClickException("the data set on disk differs from the one the bundle was "
                                   "exported from")
    users = users_with_test_items(dataset.test)
    top, _ = FaissRetriever("flat").fit(bundle.items).search(bundle.users, max(ks),
                                                             bundle.seen, users)
    now = summarise(per_user_metrics(top, users, dataset.test, ks), ks)
    then = bundle.manifest["metrics_at_export"]
    click.echo("| metric | bundle now | at export |\n|---|---|---|")
    for name, value in now.items():
        click.echo(f"| {name} | {value:.4f} | {then.get(name, float('nan')):.4f} |")


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
def ab(run_a: str, run_b: str, a_variant: str | None, b_variant: str | None, out: str,
       seed: int) -> None:
    """Offline A/B report of two runs on the same data and split (per-user metrics)."""
    import json

    from evaluation import ABError, ab_compare, render_ab_markdown, write_ab_report

    try:
        config = json.loads((Path(run_a) / "config.json").read_text())
        dataset = load_data(config)
        report = ab_compare(Path(run_a), Path(run_b), a_variant, b_variant, dataset.train,
                            dataset.test, seed)
    except (ABError, DataError, FileNotFoundError) as error:
        raise click.ClickException(str(error))
    write_ab_report(report, Path(out))
    click.echo(render_ab_markdown(report))
    click.echo(f"report written to {out}/report.html")


if __name__ == "__main__":
    cli()
