"""The shrunken encoder on a real RoBERTa code path (tiny, built offline) and the packaged
MiniLM default."""
import numpy as np
import pytest
import torch

from conftest import CORPUS
from model.text import TextEncoder, choose_layers, encode_cached


@pytest.mark.parametrize("total, keep, strategy, expected", [
    (12, 6, "even", [0, 2, 4, 7, 9, 11]),
    (6, 3, "even", [0, 2, 5]),
    (6, 3, "first", [0, 1, 2]),
    (4, 1, "even", [0]),
    (4, 4, "even", [0, 1, 2, 3]),
])
def test_choose_layers(total, keep, strategy, expected):
    assert choose_layers(total, keep, strategy) == expected


def test_choose_layers_rejects_impossible():
    with pytest.raises(ValueError):
        choose_layers(6, 7)


def test_shrunk_roberta_keeps_the_chosen_layers_weights(tiny_roberta):
    from transformers import AutoModel

    full = AutoModel.from_pretrained(tiny_roberta)
    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, strategy="even")
    assert encoder.model.config.model_type == "roberta"
    assert encoder.model.config.num_hidden_layers == 2
    assert encoder.model.config.kept_layers == [0, 3]
    for new, old in zip(encoder.model.encoder.layer, [full.encoder.layer[0], full.encoder.layer[3]]):
        for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(encoder.model.embeddings.word_embeddings.weight,
                       full.embeddings.word_embeddings.weight)


def test_embeddings_are_normalised_and_keep_input_order(tiny_roberta):
    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, batch_size=2)
    texts = CORPUS + ["short", "a much longer text about Thai food, cafes and bakeries " * 3]
    batched = encoder.encode(texts, show_progress=False)
    one_by_one = np.vstack([encoder.encode([t], show_progress=False) for t in texts])
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert np.max(batched @ batched.T - np.eye(len(texts))) < 0.9999  # texts are told apart
    # length-sorted batches and padding must not change any text's embedding
    assert np.allclose(batched, one_by_one, atol=1e-5)


def test_cls_and_mean_pooling_differ(tiny_roberta):
    mean = TextEncoder.from_pretrained(str(tiny_roberta), pooling="mean").encode(CORPUS, False)
    cls = TextEncoder.from_pretrained(str(tiny_roberta), pooling="cls").encode(CORPUS, False)
    assert not np.allclose(mean, cls, atol=1e-3)


def test_save_and_load_round_trip(tiny_roberta, tmp_path):
    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=3, pooling="cls")
    encoder.save(tmp_path / "shrunk")
    loaded = TextEncoder.from_pretrained(str(tmp_path / "shrunk"))
    assert loaded.pooling == "cls" and loaded.model.config.num_hidden_layers == 3
    assert loaded.model.config.kept_layers == encoder.model.config.kept_layers
    assert np.allclose(loaded.encode(CORPUS, False), encoder.encode(CORPUS, False), atol=1e-6)


def test_embedding_cache_skips_re_encoding(tiny_roberta, tmp_path, monkeypatch):
    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2)
    first = encode_cached(encoder, CORPUS, tmp_path)
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("re-encoded"))
    assert np.array_equal(encode_cached(encoder, CORPUS, tmp_path), first)
    other = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, pooling="cls")
    assert not np.allclose(encode_cached(other, CORPUS, tmp_path), first)  # new key


def test_quantised_encoder_stays_close(tiny_roberta):
    exact = TextEncoder.from_pretrained(str(tiny_roberta)).encode(CORPUS, False)
    int8 = TextEncoder.from_pretrained(str(tiny_roberta), quantize=True).encode(CORPUS, False)
    assert np.min(np.sum(exact * int8, axis=1)) > 0.95


def test_offline_default_minilm_ranks_by_meaning():
    encoder = TextEncoder.from_pretrained("minilm", layers=3, quantize=True)
    user, basketball, swimming = encoder.encode(
        ["This user is a basketball fan who loves watching NBA games.",
         "A sports bar showing basketball games on big screens.",
         "An indoor swimming pool with lap lanes and swim lessons."], False)
    assert encoder.model.config.model_type == "bert" and encoder.dim == 384
    assert user @ basketball > user @ swimming + 0.1


def test_a_corrupted_cache_entry_is_encoded_again(tmp_path, tiny_roberta):
    encoder = TextEncoder.from_pretrained(str(tiny_roberta), layers=2)
    first = encode_cached(encoder, CORPUS, tmp_path)
    entry = next(tmp_path.glob("*.npy"))
    np.save(entry, np.zeros_like(first))  # zeroed: loads fine, but is not what was written
    assert np.array_equal(encode_cached(encoder, CORPUS, tmp_path), first)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    assert np.array_equal(encode_cached(encoder, CORPUS, tmp_path), first)


def test_the_cache_key_follows_the_format_actually_run(tiny_roberta):
    int8 = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, quantize=True)
    fp32 = TextEncoder.from_pretrained(str(tiny_roberta), layers=2, quantize=False)
    assert int8.fingerprint() != fp32.fingerprint()
    int8._runtime, int8._fingerprint = int8.model, None  # as on a GPU: int8 not applied
    assert int8.fingerprint() == fp32.fingerprint()
