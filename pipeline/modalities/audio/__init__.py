"""The audio modality (data.modality: audio): what differs from images and texts, in one package.

    decode.py   the one definition of how an audio file becomes samples: decoded, mono,
                resampled to audio.preprocess.sample_rate, fitted to audio.preprocess.clip_seconds; what it refuses
                and what it reports (numpy, soundfile and soxr only: the service uses it)
    espeak.py   eSpeak NG speech synthesis from the library inside the espeakng-loader wheel
    sources.py  audio sources read into the ingested layout (ingest): the built-in spoken
                digits, split by voice, or a folder of class subfolders

Importing this package imports nothing heavy.
"""
