"""The text modality (data.modality: text): what differs from images, in one package.

    tokens.py   the tokenizer and TextPreprocessing, the saved recipe from text to input_ids
                (numpy and `tokenizers` only: the service uses it)
    words.py    the normalised text key (duplicates, leakage) and the word count, for ingest and
                validate
    sources.py  text sources read into the ingested layout (ingest)
    checks.py   the texts table, its Great Expectations checks and drift features (validate)

Stages keep their steps and call these for what is text-specific. Importing this package
imports nothing heavy: the Bento's service imports pipeline.text.tokens without torch.
"""
