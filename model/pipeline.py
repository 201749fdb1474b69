"""`Experiment`: load -> fit -> embed -> retrieve -> rank -> evaluate -> report, from one
`ExperimentConfig`. Every variant is a row of one table, evaluated by the same test
`Evaluator`; every fitted model is saved under the run folder's `models/`."""
from __future__ import annotations

import copy
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dataHandler import Dataset, open_dataset
from evaluation import (Evaluator, describe_comparison, file_name, format_table,
                        render_seed_summary, seed_summary, segment_metrics, summarise,
                        users_with_test_items, versus_best_classic, write_run)
from model.base import Recommender, Unavailable
from model.classic import Popularity
from model.content import TfidfRecall
from model.config import (BASELINES, RECALL_VARIANTS, ConfigError, ExperimentConfig,
                          RunConfig)
from model.ddp import finetune, graph_train_loop, ranker_train_loop
from model.distill import distill_encoder, distillation_texts
from model.engine import LocalEngine, make_engine
from model.fusion import Fusion
from model.graph import DeepWalk, GraphSAGE, LightGCN, SimGCL
from model.hygiene import clean_dataset_profiles
from model.ranking import WideDeepRanker
from model.retrieval import calibrated_retriever, calibration_users
from model.splits import apply_split, cold_evaluator, cold_start_report
from model.text import ENCODER_CONFIG, ENCODER_DIR, TextEncoder, TextRecall
from model.tuning import tuned
from utils import (atomic_path, log, peak_memory_mb, pick_device, set_seed, timed,
                   write_json_atomic, write_text_atomic)

COLD_PATH = "cold path"  # the ablation row of the fused model's cold-start path
RANK_MODES = {"widedeep": "Wide&Deep", "wide": "wide only", "deep": "deep only"}


def load_data(config: ExperimentConfig) -> Dataset:
    """Prepare (copy, download or generate) and load the configured data set."""
    data = config.data
    dataset = open_dataset(data.dataset, data.data_root, data.data_source, data.data_url,
                           config.run.seed)
    if data.clean_profiles:
        dataset.hygiene = clean_dataset_profiles(dataset)
    try:
        return apply_split(dataset, data.split, data.cold_fraction, config.run.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def build_teacher(config: ExperimentConfig) -> TextEncoder:
    """The full-size encoder the shrunken one was cut from (all layers, float)."""
    enc = config.encoder
    return TextEncoder.from_pretrained(enc.base_model, pooling=enc.pooling,
                                       max_length=enc.max_length, batch_size=enc.batch_size,
                                       quantize=False, device=pick_device(config.run.device))


def build_encoder(config: ExperimentConfig, quantize: bool | None = None) -> TextEncoder:
    """The shrunken encoder the config describes (or the saved one at `encoder_path`)."""
    enc = config.encoder
    settings = dict(pooling=enc.pooling, max_length=enc.max_length, batch_size=enc.batch_size,
                    quantize=enc.quantize if quantize is None else quantize,
                    device=pick_device(config.run.device))
    if enc.encoder_path:
        if (Path(enc.encoder_path) / ENCODER_CONFIG).exists():
            for saved in ("pooling", "max_length"):  # the encoder was trained with these
                settings.pop(saved)
        return TextEncoder.from_pretrained(enc.encoder_path, **settings)
    return TextEncoder.from_pretrained(enc.base_model, layers=enc.layers,
                                       strategy=enc.layer_strategy, **settings)


class RecallModels:
    """The run's recall models, each fitted once on first use, in dependency order (text
    feeds GraphSAGE; fusion combines the others). A model the data does not allow raises
    `Unavailable` with the reason."""

    def __init__(self, dataset: Dataset, config: ExperimentConfig, engine=None) -> None:
        self.dataset, self.config = dataset, config
        self.engine = engine or LocalEngine()
        self.device = pick_device(config.run.device)
        self._fitted: dict[str, Recommender | Unavailable] = {}

    def _once(self, name: str, fit: Callable[[], Recommender]) -> Recommender:
        if name not in self._fitted:
            try:
                self._fitted[name] = self._indexed(fit())
            except Unavailable as reason:
                self._fitted[name] = reason
        found = self._fitted[name]
        if isinstance(found, Unavailable):
            raise found
        return found

    def _indexed(self, model: Recommender) -> Recommender:
        """The run's FAISS index kind; an approximate one (--index ivf / hnsw) only where its
        top 20 keeps 95% of the exact top 20 of sampled *validation* users (else exact),
        with what was measured in the model's training log."""
        run = self.config.run
        if run.index == "flat" or not model.has_vectors():
            return model.with_index(run.index, run.nprobe)
        users = calibration_users(users_with_test_items(self.dataset.val), run.seed)
        retriever, report = calibrated_retriever(model.item_vectors, model._usable(),
                                                 model.user_vectors, model.seen, users,
                                                 run.index, run.nprobe)
        log(f"{model.name}: {run.index} index -> {report['type']} "
            f"(top-20 overlap with exact by width: {report['overlap@20_by_width']})")
        model.training_log["index"] = report
        return model.with_retriever(retriever)

    def get(self, name: str) -> Recommender:
        return getattr(self, name)()

    def release(self, keep: set[str]) -> list[str]:
        """Drop the fitted models not named in `keep` (saved already; nothing later reads
        them), so a run does not hold every variant's vectors to the end. Returns their
        names; what could not be fitted stays recorded."""
        dropped = [name for name, fitted in self._fitted.items()
                   if name not in keep and not isinstance(fitted, Unavailable)]
        for name in dropped:
            del self._fitted[name]
        return dropped

    def popularity(self) -> Popularity:
        return self._once("popularity", lambda: Popularity().fit(self.dataset))

    def _baseline(self, name: str) -> Recommender:
        fixed = {"seed": self.config.run.seed} if name == "als" else {}
        return self._once(name, lambda: tuned(name, self.dataset, fixed,
                                              self.config.run.tune_baselines,
                                              self.config.run.tune_budget))

    def als(self) -> Recommender:
        return self._baseline("als")

    def ease(self) -> Recommender:
        return self._baseline("ease")

    def rp3beta(self) -> Recommender:
        return self._baseline("rp3beta")

    def itemknn(self) -> Recommender:
        return self._baseline("itemknn")

    def tfidf(self) -> TfidfRecall:
        return self._once("tfidf", lambda: TfidfRecall(self.config.run.user_text).fit(
            self.dataset))

    def text(self) -> TextRecall:
        return self._once("text", lambda: TextRecall(
            build_encoder(self.config), self.config.run.cache_dir,
            self.config.run.user_text, self.engine).fit(self.dataset))

    def text_or_none(self) -> TextRecall | None:
        try:
            return self.text()
        except Unavailable:
            return None

    def _distilled_encoder(self) -> TextEncoder:
        """The shrunken encoder distilled from the full-size one (once per run)."""
        if not hasattr(self, "_distillation"):
            self.text()  # raises Unavailable when there is no item text
            ft = self.config.finetune
            with timed() as clock:
                try:
                    encoder, log_ = distill_encoder(
                        build_encoder(self.config, quantize=False), build_teacher(self.config),
                        distillation_texts(self.dataset), ft.distill_steps, ft.ft_batch,
                        ft.distill_lr, seed=self.config.run.seed,
                        cache_dir=self.config.run.cache_dir)
                except ValueError as error:  # too few texts, a teacher of another width
                    raise Unavailable(f"distillation: {error}") from error
            self._distillation = encoder, {**log_, "distill_seconds": round(clock["seconds"], 1)}
        return self._distillation[0]

    def student(self) -> TextEncoder:
        """A fresh copy of the encoder fine-tuning starts from (it trains in place): the
        distilled one with --distill, else the shrunken base."""
        if not self.config.finetune.distill:
            return build_encoder(self.config)
        encoder = self._distilled_encoder()
        settings = {**encoder.settings(), "quantize": self.config.encoder.quantize}
        return TextEncoder(copy.deepcopy(encoder.model), encoder.tokenizer, name=encoder.name,
                           device=encoder.device, **settings)

    def text_distilled(self) -> TextRecall:
        def fit() -> TextRecall:
            model = TextRecall(self.student(), self.config.run.cache_dir,
                               self.config.run.user_text, self.engine).fit(self.dataset)
            model._name = "text-distilled"
            model.training_log = {**self._distillation[1], **model.training_log}
            return model
        return self._once("text_distilled", fit)

    def text_features(self) -> TextRecall | None:
        """The text model GraphSAGE reads and fusion combines: the distilled one with
        --distill, else the zero-shot one; None without item text."""
        if not self.config.finetune.distill:
            return self.text_or_none()
        try:
            return self.text_distilled()
        except Unavailable as reason:
            if self.text_or_none() is not None:
                log(f"text (distilled) unavailable ({reason}); GraphSAGE and fusion use the "
                    "zero-shot text model")
            return self.text_or_none()

    def deepwalk(self) -> DeepWalk:
        g, seed = self.config.graph, self.config.run.seed
        return self._once("deepwalk", lambda: DeepWalk(
            g.dim, g.dw_walks, g.dw_length, g.dw_window, g.dw_epochs, g.dw_workers,
            seed).fit(self.dataset))

    def graphsage(self) -> GraphSAGE:
        g = self.config.graph

        def fit() -> GraphSAGE:
            text = self.text_features()
            if text is None and not g.sage_id_dim:
                raise Unavailable("no text features and --sage-id-dim 0")
            return GraphSAGE(g.dim, g.sage_layers, g.sage_id_dim, g.training(),
                             self.config.run.seed, self.device, g.sage_fanout
                             ).fit(self.dataset, text, graph_train_loop(self.engine))
        return self._once("graphsage", fit)

    def lightgcn(self) -> LightGCN:
        g = self.config.graph
        return self._once("lightgcn", lambda: LightGCN(
            g.dim, g.lgn_layers, g.training(), self.config.run.seed,
            self.device).fit(self.dataset, graph_train_loop(self.engine) if g.lgn_ray else None))

    def simgcl(self) -> SimGCL:
        g = self.config.graph
        return self._once("simgcl", lambda: SimGCL(
            g.simgcl_dim or g.dim, g.lgn_layers, g.training(), self.config.run.seed, self.device,
            g.cl_weight, g.cl_eps).fit(self.dataset,
                                       graph_train_loop(self.engine) if g.lgn_ray else None))

    def fuse_parts(self) -> list[str]:
        """The parts the fused model combines (text only where the data has item text)."""
        return [n for n in self.config.graph.fuse_parts
                if n != "text" or self.text_features() is not None]

    def fused(self, without: str | None = None) -> Fusion:
        """The fused model, or (ablation) the one fused from every part but `without`, or
        without the cold-start path (`without='cold path'`)."""
        g = self.config.graph
        names = [n for n in self.fuse_parts() if n != without]
        cold_path = g.fuse_cold and without != COLD_PATH
        return self._once("fused" if without is None else f"fused without {without}",
                          lambda: Fusion(g.fusion, g.dim, g.training(), self.config.run.seed,
                                         self.device, cold_path).fit(
                              self.dataset, {n: self.text_features() if n == "text"
                                             else self.get(n) for n in names}))


class Experiment:
    """One run: every configured variant as a row, evaluated on the test split."""

    def __init__(self, config: ExperimentConfig) -> None:
        try:
            pick_device(config.run.device)
        except ValueError as error:  # e.g. --device cuda on a machine without a GPU
            raise ConfigError(str(error)) from error
        self.config = config
        self._item_item: dict | None = None  # the ranker's item-item weights, cut once

    def rows(self) -> list[tuple[str, Callable]]:
        run, rank = self.config.run, self.config.rank
        names = requested_variants(run.variants)
        rows = [(name, self._recall_row(name)) for name in names]
        if run.ablation and "fused" in names:
            at = names.index("fused") + 1
            parts = [*self.config.graph.fuse_parts,
                     *([COLD_PATH] if self.config.graph.fuse_cold else [])]
            rows[at:at] = [(f"fused without {part}", self._ablation_row(part)) for part in parts]
        at = names.index("text") + 1 if "text" in names else len(names)
        distilled = [("text (distilled)", self._distilled_row())] if self.config.finetune.distill \
            else []
        rows[at:at] = distilled + [(f"text ({m})", self._finetuned_row(m))
                                   for m in self.config.finetune.finetune]
        if rank.rank == "widedeep":
            modes = list(RANK_MODES) if rank.rank_ablations else ["widedeep"]
            rows += [(f"{rank.rank_on} + {RANK_MODES[m]}", self._ranking_row(m)) for m in modes]
        return rows

    def final_row(self) -> str:
        """The row this run is built to produce, named before it runs: the Wide&Deep row
        when ranking, else the last recall variant."""
        run, rank = self.config.run, self.config.rank
        if rank.rank == "widedeep":
            return f"{rank.rank_on} + {RANK_MODES['widedeep']}"
        return requested_variants(run.variants)[-1]

    def run(self) -> Path:
        config = self.config
        set_seed(config.run.seed)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        dataset = load_data(config)
        summary = dataset.summary()
        log(f"{summary['dataset']}: {summary['users']:,} users, {summary['items']:,} items, "
            f"{summary['test_users']:,} test users; text coverage {summary['text_coverage']}")
        if config.run.engine == "local" and config.run.workers != RunConfig().workers:
            log("note: --workers applies to --engine ray (DeepWalk's gensim threads are "
                "--dw-workers)")
        engine = make_engine(config.run.engine, config.run.workers, config.run.ray_address,
                             config.run.ray_storage)
        try:
            return self._run(dataset, summary, engine)
        finally:
            engine.close()

    def _run(self, dataset: Dataset, summary: dict, engine) -> Path:
        config = self.config
        self.models = RecallModels(dataset, config, engine)
        self.evaluator = Evaluator.on_test(dataset, tuple(config.run.ks), engine)
        self.cold = cold_evaluator(dataset, self.evaluator)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        self.run_dir = Path(config.run.runs_dir) / summary["dataset"] / stamp
        with atomic_path(self.run_dir) as staging:
            staging.mkdir(parents=True)
            self.staging = staging
            results, per_user, top_lists = self._evaluate_rows(dataset, staging)
            notes = protocol_notes(dataset, tuple(config.run.ks))
            cold_table = None if self.cold is None else cold_start_report(
                dataset, results, per_user, self.cold.ks, config.run.seed)
            comparison = versus_best_classic(results, per_user, (*BASELINES, "tfidf"),
                                             self.final_row(), config.run.seed)
            write_run(staging, {"command": " ".join(sys.argv), **config.to_dict()}, summary,
                      results, per_user, notes, top_lists, comparison, cold_table or "")
        print(format_table(results, tuple(config.run.ks)))
        if cold_table:
            print(f"\n{cold_table}")
        for note in notes[1:]:
            print(f"note: {note}")
        if comparison is not None:
            print(describe_comparison(comparison))
        print(f"\nrun written to {self.run_dir}")
        return self.run_dir

    def _models_read(self, row: str) -> set[str]:
        """The fitted models (RecallModels names) a row reads: its own and what it is built
        from."""
        rank, text = self.config.rank, {"text", "text_distilled"}
        parts = set(self.config.graph.fuse_parts) | text | {"graphsage"}
        if row in {f"{rank.rank_on} + {label}" for label in RANK_MODES.values()}:
            return {*self._models_read(rank.rank_on), *rank.rank_item_models}
        if row.startswith("fused"):  # the fused model and its ablations
            return {"fused", *parts}
        if row.startswith("text"):
            return text
        return {row, *(text if row == "graphsage" else ())}

    def _evaluate_rows(self, dataset: Dataset, staging: Path):
        results, per_user, top_lists = {}, {}, {}
        rows = self.rows()
        for position, (variant, produce) in enumerate(rows):
            fitted = top = None  # (the previous row's: release below must free them)
            dropped = self.models.release(set().union(
                *(self._models_read(later) for later, _ in rows[position:])))
            if dropped:
                log(f"released (no later row reads them): {', '.join(dropped)}")
            log(f"== {variant}")
            try:
                with timed() as clock:
                    fitted, top, info, labels = produce(dataset)
                fitted.save(staging / "models" / file_name(variant))
            except Unavailable as reason:
                log(f"{variant}: unavailable: {reason}")
                results[variant] = {"status": "unavailable", "reason": str(reason)}
                continue
            if (dataset.user_profile_source == "written").any():
                labels["user_profile"] = np.where(dataset.user_profile_source == "written",
                                                  "written", "not written")
            labels["train_interactions"] = activity_bands(dataset.train)
            frame = self.evaluator.per_user(top)
            per_user[variant], top_lists[variant] = frame, top.astype(np.int32)
            results[variant] = {"status": "ok", "metrics": summarise(frame, self.evaluator.ks),
                                "seconds": round(clock["seconds"], 2),
                                "peak_memory_mb": round(peak_memory_mb(), 1), **info,
                                "segments": {name: segment_metrics(frame, values,
                                                                   self.evaluator.ks)
                                             for name, values in labels.items()}}
            if self.cold is not None:
                results[variant]["cold"], cold_frame = self._cold_start_row(fitted, top)
                if cold_frame is not None:
                    per_user[f"{variant} (cold)"] = cold_frame
        return results, per_user, top_lists

    def _cold_start_row(self, fitted, top: np.ndarray) -> tuple[dict, object]:
        """A row's metrics on the held-out items (ranked among themselves) or users; an
        ID-based model cannot serve them and is reported as such, not as zeros."""
        cold_items = self.cold.items is not None
        if isinstance(fitted, WideDeepRanker) and cold_items:
            return {"status": "unavailable", "reason": "a ranker re-orders its recall "
                    "candidates over all items; see the all-items table"}, None
        recall = self.models.get(self.config.rank.rank_on) \
            if isinstance(fitted, WideDeepRanker) else fitted
        serves = recall.places_cold_start or (isinstance(recall, Popularity) and not cold_items)
        if not serves:
            what = "an item" if cold_items else "a user"
            return {"status": "unavailable", "reason": f"ID-based: no vector for {what} "
                    "without training interactions"}, None
        if cold_items:
            top = self.cold.top_of(fitted)
        else:
            top = top[np.isin(self.evaluator.users, self.cold.users)]
        frame = self.cold.per_user(top)
        return {"status": "ok", "metrics": summarise(frame, self.cold.ks)}, frame

    def _recall_row(self, name: str):
        def produce(dataset: Dataset):
            model = self.models.get(name)
            top = self.evaluator.top_of(model)
            return model, top, dict(model.training_log), self._text_labels(model)
        return produce

    def _ablation_row(self, part: str):
        def produce(dataset: Dataset):
            if part not in (*self.models.fuse_parts(), COLD_PATH):
                raise Unavailable(f"{part} is not a part of the fused model here")
            model = self.models.fused(without=part)
            return model, self.evaluator.top_of(model), dict(model.training_log), {}
        return produce

    def _text_labels(self, model: Recommender) -> dict:
        if not isinstance(model, TextRecall):
            return {}
        return {"user_vector": model.user_kind}

    def _finetuned_row(self, method: str):
        def produce(dataset: Dataset):
            if not (dataset.user_profile_source == "written").any():
                raise Unavailable("fine-tuning needs users with written profiles")
            self.models.text()  # raises Unavailable when there is no item text
            with timed() as clock:
                tuned, log_ = finetune(self.models.student(), dataset, method,
                                       self.config.finetune, self.config.run.seed,
                                       self.models.engine)
            model = TextRecall(tuned, self.config.run.cache_dir,
                               self.config.run.user_text, self.models.engine).fit(dataset)
            model._name = f"text-{method}"
            folder = self.run_dir / "models" / file_name(f"text ({method})") / ENCODER_DIR
            info = {"encoder_path": str(folder), "train_seconds": round(clock["seconds"], 1),
                    **log_, **model.training_log}
            return model, self.evaluator.top_of(model), info, self._text_labels(model)
        return produce

    def _distilled_row(self):
        def produce(dataset: Dataset):
            model = self.models.text_distilled()
            return model, self.evaluator.top_of(model), dict(model.training_log), \
                self._text_labels(model)
        return produce

    def _ranking_row(self, mode: str):
        def produce(dataset: Dataset):
            rank = self.config.rank
            recall = self.models.get(rank.rank_on)
            item_item = self._item_item_weights(rank.rank_item_models)
            ranker = WideDeepRanker(mode, rank.candidates, rank.rank_positives,
                                    rank.hard_negatives, rank.random_negatives, rank.rank_epochs,
                                    rank.rank_lr, rank.rank_batch, self.config.run.seed,
                                    self.config.run.device, rank.channel_candidates,
                                    rank.rank_loss, rank.rank_patience,
                                    rank.rank_members, rank.rank_item_channels).fit(
                dataset, recall, ranker_train_loop(self.models.engine), item_item)
            users = self.evaluator.users
            with timed() as clock:
                top = ranker.recommend(users, dataset.train, self.evaluator.k)[0]
            info = {**ranker.training_log,
                    "users_ranked_per_s": round(len(users) / max(clock["seconds"], 1e-9))}
            return ranker, top, info, {}
        return produce


    def _item_item_weights(self, names: list[str]) -> dict:
        """The sparse weights of the item-item models the ranker takes scores from (fitted
        and tuned once per run like their rows; one that cannot run here is left out)."""
        if self._item_item is None:
            self._item_item = {}
            for name in names:
                try:
                    self._item_item[name] = self.models.get(name).sparse_weights()
                except Unavailable as reason:
                    log(f"ranker: no {name} feature ({reason})")
        return self._item_item


def requested_variants(variants: str) -> list[str]:
    """'all' or comma-separated names -> the variants, in the table's usual order."""
    requested = variants.split(",")
    return [n for n in RECALL_VARIANTS if variants == "all" or n in requested]


def run_experiment(config: ExperimentConfig) -> Path:
    """The `run` command: one run, or one per seed and their summary with `--seeds N`."""
    return run_seeds(config) if config.run.seeds > 1 else Experiment(config).run()


def run_seeds(config: ExperimentConfig) -> Path:
    """`--seeds N`: the whole run once per seed (SEED .. SEED+N-1), then every row's mean and
    standard deviation, written to RUNS_DIR/DATASET/STAMP-seedsN/ beside the runs."""
    run_dirs = [Experiment(config.updated({"seed": config.run.seed + k, "seeds": 1})).run()
                for k in range(config.run.seeds)]
    summary = seed_summary(run_dirs)
    folder = run_dirs[0].parent / f"{datetime.now():%Y%m%d-%H%M%S-%f}-seeds{config.run.seeds}"
    with atomic_path(folder) as staging:
        staging.mkdir(parents=True)
        write_json_atomic(staging / "summary.json", summary)
        write_text_atomic(staging / "summary.md", render_seed_summary(summary))
    print(render_seed_summary(summary))
    print(f"seed summary written to {folder}")
    return folder


def activity_bands(train) -> np.ndarray:
    """Per user: '0', '1-3', '4-10' or '>10' training interactions (the few-shot regime)."""
    counts = np.diff(train.indptr)
    return np.select([counts == 0, counts <= 3, counts <= 10], ["0", "1-3", "4-10"], ">10")


def protocol_notes(dataset: Dataset, ks: tuple[int, ...]) -> list[str]:
    """What a reader of the table must know about this data: unreachable test pairs, cut-offs
    that cover the catalogue, test users with no training history."""
    repeats = dataset.test.multiply(dataset.train).nnz
    notes = ["Peak MB is the process's peak resident memory up to the end of that variant."]
    if repeats == dataset.test.nnz:
        notes.append("every test pair also occurs in training: with training items excluded "
                     "(standard protocol) nothing can be hit, so every metric is 0.")
    elif repeats:
        notes.append(f"{repeats:,} test pairs also occur in training; with training items "
                     "excluded from ranking they cannot be hit (standard protocol).")
    if max(ks) >= dataset.n_items:
        notes.append(f"K = {max(ks)} covers the whole catalogue of {dataset.n_items} items: "
                     "Recall@K is 1 for every model at that cut-off.")
    test_users = np.flatnonzero(np.diff(dataset.test.indptr) > 0)
    cold = int((np.diff(dataset.train.indptr)[test_users] == 0).sum())
    if cold:
        notes.append(f"{cold:,} test users have no training interactions: collaborative models "
                     "score them from untrained or empty vectors; text models use their "
                     "profile where they have one.")
    return notes
