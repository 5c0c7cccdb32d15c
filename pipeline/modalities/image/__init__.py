"""The image modality (data.modality: image): what differs from other modalities, in one package.

    preprocess.py  Preprocessing, the saved recipe from a decoded image to model input (numpy and
                   Pillow only: the service uses it)
    warp.py        batched random rotation, translation and zoom on the device (augment, train)
    sources.py     the `sources` part: image.ingest.source (digits, a folder) read into the ingested layout
    checks.py      the `checks` part: the images table, its Great Expectations checks, the data
                   profile and drift features (validate)
    augment.py     the augmented train split (augment)
    models.py      the model registry (image.train.model) and the image side of training, per-epoch
                   warps included (train, compress, pipeline.core.saved_model)
    export.py      ONNX export, the MAC example, what int8 quantises (compress)
    scoring.py     the baselines: majority class, logistic regression on the pixels,
                   servable (evaluate)
    infra.py       /classify and /classify_npy answers for infra validation, gRPC pixel requests
                   (package)
    serving.py     each endpoint's input checked, pixels as model input (the service, gRPC;
                   numpy and Pillow only)

Importing this package imports nothing heavy.
"""
