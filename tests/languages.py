"""A user's folder of short texts in six languages, made up here: each language has its own
letters, syllable shapes and a Zipf-distributed vocabulary of its own words, and every text also
borrows from words all six share (names, numbers), so a text is told apart by its letter and
word statistics, as in language identification. Two languages are not written in ASCII (one
in Cyrillic letters, one with diacritics), as users' texts often are not. Not the built-in
chatterbot-corpus set: nothing here resembles the demo data.

    python -m tests.languages OUT [--per-class N] [--seed S]   writes OUT/<language>/<n>.txt
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

# language -> (onsets, vowels, codas): a syllable is onset + vowel + coda, each drawn uniformly
LANGUAGES = {
    "kelvari": ("k t r v l s n", "a e i", "r n s - -"),
    "oumaho": ("m h p w", "o u a oo", "- - - -"),
    "zdrenka": ("zd dr br sk tr gr", "e y", "nk st k"),
    "lusoni": ("l s n f", "ü ö e", "ss nn -"),
    "tavasi": ("t v š č ž", "a i", "j - -"),
    "bralov": ("б р л в д", "а о ы", "в к - -"),
}
SHARED = [f"{w}" for w in ("maria", "tokyo", "2024", "ok", "internet", "radio", "12", "london",
                           "taxi", "hotel", "anna", "100")]
LEXICON = 300          # words of its own per language
WORDS = (4, 12)        # words per text
BORROWED = 0.2         # share of a text's words drawn from SHARED


def lexicon(onsets: str, vowels: str, codas: str, rng: random.Random) -> list[str]:
    """LEXICON distinct words of 1-3 syllables, most frequent first."""
    parts = [s.split() for s in (onsets, vowels, codas)]
    words: list[str] = []
    while len(words) < LEXICON:
        word = "".join(rng.choice(parts[0]) + rng.choice(parts[1])
                       + rng.choice(parts[2]).replace("-", "")
                       for _ in range(rng.randint(1, 3)))
        if word not in words:
            words.append(word)
    return words


def texts(language: str, n: int, seed: int) -> list[str]:
    """n texts of `language`, drawn with `seed`."""
    rng = random.Random(f"{language}/{seed}")
    words = lexicon(*LANGUAGES[language], random.Random(language))  # the language, fixed
    zipf = [1 / (rank + 1) ** 1.1 for rank in range(len(words))]
    out = []
    for _ in range(n):
        length = rng.randint(*WORDS)
        own = rng.choices(words, zipf, k=length)
        chosen = [rng.choice(SHARED) if rng.random() < BORROWED else w for w in own]
        text = " ".join(chosen)
        out.append(text[0].upper() + text[1:] + rng.choice(".?!"))
    return out


def write_language_folder(out: Path, per_class: int, seed: int) -> Path:
    """out/<language>/<n>.txt: per_class texts of each language (a text.ingest.source folder)."""
    for language in LANGUAGES:
        (out / language).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts(language, per_class, seed)):
            (out / language / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_language_folder(args.out, args.per_class, args.seed)
