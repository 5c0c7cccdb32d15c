"""The image modality (data.modality: image): what differs from other modalities, in one package.

    preprocess.py  Preprocessing, the saved recipe from a decoded image to model input (numpy and
                   Pillow only: the service uses it)
    warp.py        batched random rotation, translation and zoom on the device (augment, train)
    scoring.py     a split as model input, no baselines, the gate's floor (evaluate, package)
    infra.py       /classify and /classify_npy answers for infra validation, gRPC pixel requests
                   (package)
    serving.py     each endpoint's input checked, pixels as model input (the service, gRPC;
                   numpy and Pillow only)

Importing this package imports nothing heavy.
"""
