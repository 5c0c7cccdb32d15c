"""The text modality (data.modality: text): what differs from images, in one package.

    preprocess.py  the tokenizer and TextPreprocessing, the saved recipe from text to input_ids
                (numpy and `tokenizers` only: the service uses it)
    words.py    the normalised text key (duplicates, leakage) and the word count, for ingest and
                validate
    sources.py  the `sources` part: text sources read into the ingested layout (ingest)
    checks.py   the `checks` part: the texts table, its Great Expectations checks, the data
                profile and drift features (validate)
    augment.py  tokenizer training (augment) and the Augmenter: texts as token ids and their
                augmented views, drawn per text id and epoch (train, compress)
    models.py   the text model registry, the local Hugging Face checkpoint wrapper and the text
                side of training (train, compress, pipeline.core.saved_model)
    export.py   ONNX export, what int8 quantises, the MAC example (compress)
    scoring.py  the baselines: majority class, TF-IDF + logistic regression, servable as an
                ONNX graph that reads texts (evaluate)
    infra.py    the text endpoints' answers for infra validation, gRPC BYTES requests (package)
    serving.py  each endpoint's input checked, texts as input_ids (the service, gRPC; light)

Stages keep their steps and call these for what is text-specific. Importing this package
imports nothing heavy: the Bento's service imports pipeline.modalities.text.serving and tokens without torch.
"""
