"""The text modality's scoring part (pipeline/core/modality.py Scoring), for evaluate.

Evaluate and package read a split as texts (pipeline/core/dataset.py split_of) and encode each
batch as the service does (serving.py model_input: the model folder's own tokenizer.json into
int64 input_ids, padded to the batch's longest text; evaluate's latency batches are its first
batch's texts at that length).

The baselines evaluate's gate measures the variants against (pipeline/core/baselines.py):

    baseline_majority  the train split's most frequent class
    baseline_tfidf_lr  the number a text practitioner checks first: TF-IDF features and a
                       logistic regression (scikit-learn, its defaults: word unigrams of two or
                       more word characters, lowercased, l2-normalised TF-IDF, L2-regularised LR
                       with C=1). Served as one ONNX graph (skl2onnx) that reads the texts
                       themselves: a card whose architecture is tokens.RAW_TEXT_MODEL gets its
                       texts as a string tensor [N, 1] (tokens.raw_texts) here and in the
                       service, not input_ids.

skl2onnx's own conversion of the default token pattern, `[a-zA-Z0-9_]+`, drops every word
outside ASCII: on the built-in 10 languages its graph agreed with scikit-learn on 74% of the
test texts (accuracy 0.53 against 0.78). TOKENS below is the pattern in RE2's syntax (ONNX
Runtime's Tokenizer): letters, digits and _ in any script, two or more; with it the graph agreed
on every test text (probabilities within 2e-7). ONNX Runtime's StringNormalizer lowercases in a
C++ locale that must exist on the serving machine: skl2onnx leaves it unset, so ONNX Runtime
asks for en_US.UTF-8 and the session fails to load where that locale is not installed (this
machine, a python:3.11-slim image); C.UTF-8 is built into glibc >= 2.35 and lowercases Unicode.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from pipeline.core.baselines import LOGREG, Baseline, majority, scored, streamed
from pipeline.core.card import PREDICT_BATCH
from pipeline.core.dataset import Items, read_text, sample, split_items

if TYPE_CHECKING:
    from pipeline.core.card import ModelCard
    from pipeline.params import Params

SETUP = "TfidfVectorizer() + LogisticRegression(max_iter=1000), scikit-learn defaults"
TOKENS = r"[\pL\pN_][\pL\pN_]+"  # scikit-learn's (?u)\b\w\w+\b in RE2 (see above)
LOCALE = "C.UTF-8"


def baselines(data: Path, test: Items, card: ModelCard, params: Params) -> dict[str, Baseline]:
    """The majority class and TF-IDF + LR, fitted on data's train split, scored on `test`
    (texts)."""
    classes = len(card.classes)
    train = split_items(data, "train", read_text, "texts")
    train_labels = train.labels()
    pick = sample(len(train_labels), params.evaluate.baseline_train_items, params.data.seed)
    model = make_pipeline(TfidfVectorizer(), LogisticRegression(**LOGREG))
    model.fit([text for texts in train.taken(pick, PREDICT_BATCH) for text in texts],
              train_labels[pick])
    val = streamed(model, split_items(data, "val", read_text, "texts"), list, classes)
    vocabulary = len(model[0].vocabulary_)
    missing = sorted(set(range(classes)) - set(model.classes_.tolist()))
    return {"baseline_majority": majority(train_labels, test.labels(), val[1], classes),
            "baseline_tfidf_lr": scored(
                model, SETUP + (f" ({len(pick)} train texts)" if len(pick) < len(train_labels)
                                else ""),
                streamed(model, test, list, classes), val, classes,
                macs=vocabulary * classes, params=vocabulary * (classes + 1) + classes,
                export=None if missing else
                lambda path: path.write_bytes(tfidf_onnx(model, classes)),
                why_not_servable=f"its train texts lack class {card.classes[missing[0]]!r}"
                if missing else None)}


def tfidf_onnx(model, classes: int) -> bytes:
    """The fitted TF-IDF + LR pipeline as one ONNX graph: string `text` [N, 1] in, float32
    `logits` [N, classes] out (the log of its probabilities, whose softmax they are)."""
    import onnx
    from onnx import helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType

    graph = to_onnx(model, initial_types=[("text", StringTensorType([None, 1]))],
                    options={TfidfVectorizer: {"tokenexp": TOKENS, "locale": LOCALE},
                             LogisticRegression: {"zipmap": False}})
    graph.graph.node.append(helper.make_node("Log", ["probabilities"], ["logits"]))
    del graph.graph.output[:]
    graph.graph.output.append(helper.make_tensor_value_info(
        "logits", onnx.TensorProto.FLOAT, [None, classes]))
    return graph.SerializeToString()
