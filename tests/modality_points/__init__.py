"""A toy fourth modality, "points": classes of points in a few dimensions, each item a line of
numbers in a .txt file. It is the layout's test (tests/test_new_modality.py): this folder copied
to pipeline/modalities/points/ of a project, and its section (params.yaml here) added to that
project's params.yaml, is all it takes for the seven stages to run on points and the Bento to
serve them. It is not one of Kiln's modalities: nothing here is shipped.

    config      params.yaml `points:`: its subsections, typed and range-checked
    preprocess  the record every card saves: features, and the train split's mean and std
    sources     ingest: "blobs", Gaussian blobs around seeded centres (the only source)
    checks      validate: the points table (a line that is no point, a value past the bound,
                duplicates and leaks by the point's values), its profile and drift features
    augment     jittered copies of the training points
    models      an MLP in a registry
    export      ONNX: float32 `input` (N, features)
    scoring     the majority and logistic-regression baselines
    infra       no REST endpoint of its own; gRPC ModelInfer requests of FP32 points
    serving     gRPC's input checked (shape, finite, within serve.max_abs); REST says to use gRPC
"""
