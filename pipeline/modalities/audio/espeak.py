"""Speech from eSpeak NG, through the library and voice data inside the `espeakng-loader` wheel:
no program to install, nothing downloaded (the built-in data set, pipeline/modalities/audio/sources.py).

The wheel ships libespeak-ng and espeak-ng-data only, no Python API, so this binds the seven
calls of eSpeak NG's C API (speak_lib.h, espeak_ng.h) it needs with ctypes: synchronous
synthesis into a callback that collects the 16-bit samples. A voice is an accent (a language
voice, `en-us`) and a variant (`m3`, `klatt4`, one of espeak-ng-data/voices/!v), `en-us+m3`.

Some variants (f2, f3, f5, Alicia, Demonic, sandro, victor, whisper, whisperf) add noise
(breath, pitch flutter) from eSpeak NG's own generator, which it seeds from the clock's whole
second at start; it is seeded with espeak_ng_SetRandSeed before every utterance instead, so the
same call gives the same samples in any process (tests/test_audio_data.py fails without it).
The library keeps one global state: one synthesiser per process.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _VOLUME, _PITCH = 1, 2, 3  # espeak_PARAMETER
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class Synthesiser:
    """eSpeak NG loaded from the wheel; `sample_rate` is its output rate (22,050 Hz)."""

    def __init__(self):
        import espeakng_loader

        self.data = Path(espeakng_loader.get_data_path())
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                          ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                          ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                      str(self.data).encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG did not start with its data at {self.data}")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, count, _events) -> int:
        if samples and count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # go on

    def variants(self) -> list[str]:
        """The voice variants the wheel's data holds, sorted."""
        return sorted(p.name for p in (self.data / "voices" / "!v").iterdir() if p.is_file())

    def say(self, text: str, voice: str, wpm: int, pitch: int, volume: int, seed: int
            ) -> np.ndarray:
        """`text` spoken by `voice` at `wpm` words per minute, base pitch `pitch` and `volume`
        (0..200, 100 is eSpeak NG's own): int16 samples at sample_rate, the same for the same
        arguments."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, wpm, 0)
        self.lib.espeak_SetParameter(_PITCH, pitch, 0)
        self.lib.espeak_SetParameter(_VOLUME, volume, 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        self._chunks = []
        data = text.encode("utf-8")
        status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                       None, None)
        self.lib.espeak_Synchronize()
        if status != 0:
            raise RuntimeError(f"eSpeak NG failed to say {text!r} with {voice} (status {status})")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)


@functools.cache
def synthesiser() -> Synthesiser:
    """The process's one synthesiser."""
    return Synthesiser()
