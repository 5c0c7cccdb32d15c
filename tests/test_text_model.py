"""The text models (data.modality: text): augmentation on token ids, the registry's models in
ONNX Runtime, structured pruning that really removes heads and FFN units, int8, the augment ->
train -> compress -> evaluate stages on generated texts, and a local Hugging Face checkpoint
through the train stage."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import StageError
from pipeline.core import saved_model
from pipeline.core.card import onnx_predictor
from pipeline.core.pruning import structured_l1
from pipeline.stages.compress import count_macs_on, count_params, quantize_int8
from pipeline.core.dataset import load_texts, write_items
from pipeline.core.stream import TrainStream, item_keys
from pipeline.modalities.text.config import Augment as TextAugment
from pipeline.params import load_params
from pipeline.modalities.text import export, preprocess as tokens
from pipeline.modalities.text import models as text_models
from pipeline.modalities.text.augment import augmenter, delete, mask, swap, write_augmented
from tests.conftest import merged
from tests.project import stage_argv
from tests.streams import EVERYTHING

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("alpha", "bravo", "charlie", "delta")
SPLITS = {"train": 40, "val": 8, "test": 12}  # texts per class
# Tiny models and few epochs: each training run takes a second or two on 2 cores.
TEXT = {"preprocess": {"vocab_size": 200, "max_tokens": 16},
        "train": {"dim": 16, "layers": 1, "heads": 4, "ffn": 32, "max_epochs": 2,
                  "batch_size": 32, "lr": 0.01},
        "augment": {"copies": 1, "deletion": 0.1, "swap": 0.1, "mask": 0.1, "seed": 0}}


def write_texts(folder: Path, seed: int) -> Path:
    """An ingested text data set (the contract's shards), items texts/<split>/<class>/<n>.txt,
    each 3-14 words drawn from its class's 25 words (80%) and 25 shared words (20%)."""
    rng = random.Random(seed)
    shared = [f"common{i}" for i in range(25)]
    items = []
    for split, per_class in SPLITS.items():
        for label in CLASSES:
            own = [f"{label}{i}" for i in range(25)]
            for n in range(per_class):
                words = [rng.choice(own if rng.random() < 0.8 else shared)
                         for _ in range(rng.randint(3, 14))]
                items.append(({"id": f"texts/{split}/{label}/{n}.txt", "label": label,
                               "split": split, "source": f"generated {seed}"},
                              " ".join(words).encode("utf-8")))
    write_items(folder, items, list(CLASSES))
    return folder


@pytest.fixture(scope="module")
def vocab():
    """A tokenizer trained on generated texts and its preprocessing."""
    texts = [" ".join(f"{c}{i % 25} common{i % 7}" for i in range(n, n + 9))
             for c in CLASSES for n in range(30)]
    tokenizer = tokens.train_tokenizer(texts, TEXT["preprocess"]["vocab_size"], lowercase=True)
    prep = tokens.TextPreprocessing(tokenizer_sha256="0" * 64, max_tokens=TEXT["preprocess"]["max_tokens"],
                                    lowercase=True, pad_id=tokenizer.token_to_id("[PAD]"),
                                    mask_id=tokenizer.token_to_id("[MASK]"),
                                    vocab_size=tokenizer.get_vocab_size())
    return tokenizer, prep, texts


def padded_ids(n: int, length: int, seed: int) -> torch.Tensor:
    """n rows of [CLS]=2 and random ids 5..99, each of a random length, padded with 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    ids[torch.arange(length) >= lengths[:, None]] = 0
    ids[:, 0] = 2
    return ids


# --- augmentation ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_views(vocab, tmp_path_factory):
    """The Augmenter of the vocab fixture's tokenizer, saved in a folder, with high rates."""
    folder = tmp_path_factory.mktemp("tokenizer")
    prep = tokens.save(vocab[0], folder, TEXT["preprocess"]["max_tokens"], lowercase=True)
    params = load_params(REPO / "params.yaml")
    augment = TextAugment(copies=2, deletion=0.2, swap=0.2, mask=0.2, seed=3)
    text = dataclasses.replace(params.text, augment=augment)
    return augmenter(dataclasses.replace(params, text=text), prep, folder)


def test_views_keep_cls_and_padding_and_follow_the_seed(text_views):
    ids = padded_ids(400, 16, seed=0)
    keys = item_keys(f"texts/{i}.txt" for i in range(400))
    assert text_views.views == 3
    assert text_views.view(ids, keys, 0, 0) is ids  # view 0: the texts themselves
    assert torch.equal(text_views.to_input(ids), ids)  # some text uses all 16 tokens
    short = torch.nn.functional.pad(ids[:, :5], (0, 11), value=text_views.prep.pad_id)
    assert torch.equal(text_views.to_input(short), ids[:, :5])  # cut to the longest text
    copy1, copy2 = text_views.view(ids, keys, 0, 1), text_views.view(ids, keys, 0, 2)
    assert copy1.shape == (400, 16) and copy1.dtype == torch.int64
    assert torch.equal(copy1, text_views.view(ids, keys, 0, 1))
    reseeded = dataclasses.replace(text_views, p=dataclasses.replace(text_views.p, seed=4))
    assert not torch.equal(copy1, reseeded.view(ids, keys, 0, 1))
    assert not torch.equal(copy1, copy2)
    for copy in (copy1, copy2):
        assert (copy[:, 0] == 2).all()  # [CLS] untouched
        # Padding stays padding (mask id 4 is not pad); deletion only adds padding at the end.
        assert (copy[ids == 0] == 0).all()
        length = (copy != 0).sum(1)
        assert (copy != 0).int().argmin(1)[length < 16].equal(length[length < 16])
        assert (length >= 2).all()  # [CLS] and at least one token survive


def test_a_texts_view_is_its_own_alone_or_in_any_batch(text_views, vocab, monkeypatch):
    """A view depends on the text's id, the seed, the epoch and the view: not on the texts
    beside it, their order, how far the batch is padded, nor how many are drawn at once."""
    texts = [t[:6 * (1 + i % 12)] for i, t in enumerate(vocab[2][:24])]  # of many lengths
    items = torch.from_numpy(text_views.decode([t.encode("utf-8") for t in texts]))
    assert items.shape == (24, 16) and items.dtype == torch.int64
    keys = item_keys(f"texts/train/{i}.txt" for i in range(24))
    batch = text_views.view(items, keys, 1, 1)
    for i in (0, 5, 23):
        length = int((items[i] != 0).sum())
        alone = text_views.view(items[i:i + 1, :length], keys[i:i + 1], 1, 1)
        assert torch.equal(alone[0], batch[i, :length]) and (batch[i, length:] == 0).all()
    order = np.random.default_rng(0).permutation(24)
    assert torch.equal(text_views.view(items[order], keys[order], 1, 1), batch[order])
    assert not torch.equal(batch, items)
    assert not torch.equal(batch, text_views.view(items, keys, 2, 1))  # another epoch
    assert not torch.equal(batch, text_views.view(items, keys, 1, 2))  # another view
    monkeypatch.setattr("pipeline.modalities.text.augment.DRAW_ROWS", 5)
    assert torch.equal(text_views.view(items, keys, 1, 1), batch)  # drawn 5 texts at a time


def test_texts_stream_alike_cached_or_read_a_window_at_a_time(text_views, tmp_path):
    """Decoded texts have one width (max_tokens), not their window's longest: windows read apart
    make the same batches as the split decoded at once."""
    # Row groups of about 5 texts (13 of them), texts 1 word long first, 6 words last.
    items = [({"id": f"texts/train/{n}.txt", "label": CLASSES[n % 4], "split": "train",
               "source": "lengths"}, " ".join(["alpha1"] * (1 + n // 10)).encode("utf-8"))
             for n in range(60)]
    data = tmp_path / "ingested"
    write_items(data, items, list(CLASSES), row_group_bytes=100)

    def batches(cache: bool) -> list:
        stream = TrainStream(data, "train", text_views, seed=0, shuffle_bytes=1,
                             device=torch.device("cpu"), cache_bytes=EVERYTHING if cache else 0,
                             workers=0)
        return [b for epoch in (0, 1) for b in stream.batches(epoch, 32)]

    cached, streamed = batches(True), batches(False)
    assert len(cached) == len(streamed) == 2 * -(-60 * 3 // 32)
    for (x, y), (sx, sy) in zip(cached, streamed):
        assert torch.equal(x, sx) and torch.equal(y, sy)


def test_each_operation_hits_its_rate_and_only_content():
    ids = padded_ids(2000, 32, seed=1)
    content = (ids != 0).sum() - len(ids)  # tokens after [CLS]
    u = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    masked = mask(ids, 0.2, 0, 4, u)
    assert abs((masked == 4).sum() / content - 0.2) < 0.01
    assert ((masked == 4) <= (ids != 0)).all() and (masked[:, 0] == 2).all()
    deleted = delete(ids, 0.15, 0, u)
    assert abs(1 - ((deleted != 0).sum() - len(ids)) / content - 0.15) < 0.01
    # Deletion keeps order: every row is a subsequence of its original.
    for before, after in zip(ids[:50].tolist(), deleted[:50].tolist()):
        it = iter(before)
        assert all(t in it for t in after if t != 0)
    swapped = swap(ids, 0.1, 0, u)
    assert torch.equal(swapped.sort(1).values, ids.sort(1).values)  # same multiset per row
    moved = (swapped != ids).sum() / content
    assert 0.1 < moved < 0.22  # each swap moves two tokens (fewer where neighbours are equal)
    assert torch.equal(swapped == 0, ids == 0) and (swapped[:, 0] == 2).all()


# --- models, ONNX, pruning, int8 ---------------------------------------------------------------

def build(name: str, prep: tokens.TextPreprocessing) -> torch.nn.Module:
    text = load_params(REPO / "params.yaml").text
    train = dataclasses.replace(text.train, dim=32, layers=2, heads=4, ffn=64, dropout=0.0)
    p = dataclasses.replace(text, train=train)
    torch.manual_seed(0)
    return text_models.build(name, prep, 5, p).eval()


def test_unknown_text_model_names_the_key(vocab):
    with pytest.raises(StageError, match=r"text.train.model: expected one of \['text_encoder', 'text_bag'\], got 'lstm'"):
        text_models.build("lstm", vocab[1], 2, load_params(REPO / "params.yaml").text)


@pytest.mark.parametrize("name", sorted(text_models.MODELS))
def test_onnx_logits_match_torch_at_every_length(name, vocab, tmp_path):
    tokenizer, prep, texts = vocab
    model = build(name, prep)
    export.export_onnx(model, prep, tmp_path / "m.onnx")
    predict = onnx_predictor(tmp_path / "m.onnx", threads=1)
    for batch in (texts[:1], texts[:7], texts[3:40]):
        for max_tokens in (2, 5, prep.max_tokens):
            ids = tokens.encode(tokenizer, [t[:max_tokens * 6] for t in batch], prep)
            with torch.no_grad():
                expected = model(torch.from_numpy(ids)).numpy()
            got = predict(ids)
            assert got.shape == (len(batch), 5) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=1e-4)
    # Padding is masked: a text's logits do not depend on how much padding follows it.
    one = tokens.encode(tokenizer, ["alpha1 bravo2"], prep)
    longer = np.concatenate([one, np.full((1, prep.max_tokens - one.shape[1]), prep.pad_id)], 1)
    np.testing.assert_allclose(predict(longer), predict(one), atol=1e-5)


def test_pruning_removes_heads_and_ffn_units(vocab, tmp_path):
    tokenizer, prep, texts = vocab
    model = build("text_encoder", prep)
    example, _ = export.mac_example(prep)
    macs, n_params = count_macs_on(model, example), count_params(model)
    widths = structured_l1(model, 0.5, torch.from_numpy(tokens.encode(tokenizer, texts[:2], prep)))
    for i, layer in enumerate(model.layers):
        assert layer.attention.num_heads == 2
        assert widths[f"layers.{i}.attention.q"] == (32, 16)  # 2 of 4 heads of 8 dims
        assert widths[f"layers.{i}.ffn.0"] == (64, 32)
        assert layer.attention.out.in_features == 16 and layer.ffn[2].in_features == 32
    assert model.tokens.embedding_dim == 32 and model.classifier.out_features == 5
    assert count_params(model) < n_params and count_macs_on(model, example) < macs
    export.export_onnx(model, prep, tmp_path / "pruned.onnx")
    ids = tokens.encode(tokenizer, texts[:9], prep)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_predictor(tmp_path / "pruned.onnx", 1)(ids),
                                   model(torch.from_numpy(ids)).numpy(), atol=1e-4)


def test_pruning_the_bag_removes_embedding_dims(vocab):
    tokenizer, prep, texts = vocab
    model = build("text_bag", prep)
    widths = structured_l1(model, 0.5, torch.from_numpy(tokens.encode(tokenizer, texts[:2], prep)))
    assert widths == {"tokens": (32, 16)} and model.classifier.in_features == 16


def test_int8_is_smaller_and_answers_a_text_alike_alone_or_in_a_batch(vocab, tmp_path):
    """What the server promises: a text's answer does not depend on the texts sent with it.
    ORT's dynamic int8 broke it (activation scales per call): infra validation refused it."""
    tokenizer, prep, texts = vocab
    model = build("text_encoder", prep)
    export.export_onnx(model, prep, tmp_path / "float.onnx")
    ids = tokens.encode(tokenizer, texts, prep)
    quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx", ids[:64], per_channel=True,
                  reduce_range=True, export=export)
    # Every MatMul and Gather weight is int8; on a model this tiny, QDQ nodes keep 70%.
    assert (tmp_path / "int8.onnx").stat().st_size < 0.75 * (tmp_path / "float.onnx").stat().st_size
    float_logits = onnx_predictor(tmp_path / "float.onnx", 1)(ids)
    int8 = onnx_predictor(tmp_path / "int8.onnx", 1)
    batch = int8(ids)
    assert (batch.argmax(1) == float_logits.argmax(1)).mean() > 0.9
    alone = np.concatenate([int8(tokens.encode(tokenizer, [t], prep)) for t in texts[:40]])
    np.testing.assert_allclose(alone, batch[:40], atol=1e-5)


# --- the stages --------------------------------------------------------------------------------

def run(project: Path, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline.stages", *argv], cwd=project,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def augment_in_process(project: Path, monkeypatch) -> None:
    """The augment stage's main, in this process (it needs no fresh one; saves a start-up)."""
    from pipeline.stages import augment as augment_stage

    monkeypatch.chdir(project)
    augment_stage.main(["--data", "data/ingested", "--out", "data/augmented"])


TRAIN = stage_argv("train")


@pytest.mark.slow
def test_a_local_hugging_face_checkpoint_trains_through_the_stage(tmp_path, params_writer,
                                                                  monkeypatch, stage):
    """The train and compress stages in this process (the `stage` fixture: their entry point,
    without two fresh starts of torch and transformers)."""
    from transformers import BertConfig, BertForSequenceClassification

    write_texts(tmp_path / "data/ingested", seed=1)
    texts = load_texts(tmp_path / "data/ingested", "train")[0]
    tokenizer = tokens.train_tokenizer(texts, 150, lowercase=True)
    checkpoint = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=37, max_position_embeddings=32,
        num_labels=2)).save_pretrained(checkpoint)
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    params_writer(tmp_path, {"data": {"modality": "text"},
                             "text": merged(TEXT, {"preprocess": {"pretrained": str(checkpoint)},
                                                   "train": {"max_epochs": 5}})})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    augment_in_process(tmp_path, monkeypatch)
    assert (tmp_path / "data/augmented/tokenizer.json").exists()
    code, out = stage(tmp_path, *TRAIN)
    assert code == 0 and "train: pretrained" in out, out
    model, card = saved_model.load(tmp_path / "models/float")
    assert card.architecture == "pretrained" and len(card.classes) == 4
    assert model.hf.config.hidden_size == 32  # the checkpoint's, not text.train.dim
    ids = tokens.encode(tokens.load(tmp_path / "models/float", card.preprocessing),
                        ["alpha1 alpha2 alpha3", "delta4"], card.preprocessing)
    with torch.no_grad():
        assert model(torch.from_numpy(ids)).shape == (2, 4)
    assert card.val.accuracy > 0.5  # learnt from the checkpoint's start (chance is 0.25)

    # Compress's steps on it: half the heads and FFN units go, ONNX Runtime agrees with torch.
    n_params = count_params(model)
    widths = structured_l1(model, 0.5, torch.from_numpy(ids))
    attention = model.hf.bert.encoder.layer[0].attention.self
    assert attention.num_attention_heads == 1 and attention.query.out_features == 16
    assert model.hf.bert.encoder.layer[0].intermediate.dense.out_features == 18
    assert count_params(model) < n_params and len(widths) == 4  # query, key, value, FFN
    # The compress stage does the same to the trained checkpoint (its compress.json).
    code, out = stage(tmp_path, *stage_argv("compress"))
    assert code == 0, out
    report = json.loads((tmp_path / "models/compressed/compress.json").read_text())
    assert report["heads"] == {"hf.bert.encoder.layer.0.attention.self": 1}
    export.export_onnx(model, card.preprocessing, tmp_path / "pruned.onnx")
    predict = onnx_predictor(tmp_path / "pruned.onnx", 1)
    for length in (2, ids.shape[1]):  # the export traced 3 tokens: L stays dynamic
        with torch.no_grad():
            np.testing.assert_allclose(predict(ids[:, :length]),
                                       model(torch.from_numpy(ids[:, :length])).numpy(), atol=1e-4)


@pytest.mark.slow
def test_augment_writes_the_same_tokenizer_from_every_process(tmp_path, params_writer):
    """`dvc repro`'s promise: the same texts and params give the same bytes, in a fresh process
    (a new hash seed) too. On these texts tokenizers 0.23's WordPiece trainer gave another
    vocabulary on every run, so every model after it changed."""
    params_writer(tmp_path, {"data": {"modality": "text"}, "text": {"ingest": {"per_class": 150}}})
    run(tmp_path, "ingest", "--out", "data/ingested")
    outputs = []
    for out in ("first", "second"):
        run(tmp_path, "augment", "--data", "data/ingested", "--out", out)
        outputs.append({f.name: f.read_bytes() for f in sorted((tmp_path / out).iterdir())})
    assert sorted(outputs[0]) == ["preprocessing.json", "tokenizer.json"]
    assert outputs[0] == outputs[1]


def test_augment_says_how_many_texts_are_cut_at_max_tokens(tmp_path):
    """The model reads text.preprocess.max_tokens tokens of a text: the stage's summary says how many
    training texts lose their end (every one of these has [CLS] and 3 to 14 words). It writes the
    tokenizer and preprocessing, and its augmenter encodes the texts with them."""
    data = write_texts(tmp_path / "ingested", seed=2)
    texts = load_texts(data, "train")[0]
    params = load_params(REPO / "params.yaml")
    def with_preprocess(**values):
        text = params.text
        preprocess = dataclasses.replace(text.preprocess, **values)
        return dataclasses.replace(params, text=dataclasses.replace(text, preprocess=preprocess))

    long = with_preprocess(vocab_size=200, max_tokens=64)
    summary = write_augmented(data, tmp_path / "a", long)
    assert "0 texts (0.0%) cut at text.preprocess.max_tokens 64" in summary
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == ["preprocessing.json",
                                                                  "tokenizer.json"]
    prep = tokens.TextPreprocessing(**json.loads((tmp_path / "a/preprocessing.json").read_text()))
    decoded = augmenter(long, prep, tmp_path / "a").decode([t.encode("utf-8") for t in texts])
    encoded = tokens.encode(tokens.load(tmp_path / "a", prep), texts, prep)
    assert decoded.shape == (len(texts), 64)  # padded to max_tokens: every window alike
    np.testing.assert_array_equal(decoded[:, :encoded.shape[1]], encoded)
    assert (decoded[:, encoded.shape[1]:] == prep.pad_id).all()
    summary = write_augmented(data, tmp_path / "b", with_preprocess(vocab_size=200, max_tokens=2))
    assert f"{len(texts)} texts (100.0%) cut at text.preprocess.max_tokens 2" in summary
