"""The audio models (data.modality: audio): the log-mel front end against torch.stft, waveform
perturbation (each clip's own, per epoch and view) and SpecAugment, the registry's models in ONNX
Runtime on raw waveforms, structured pruning that shrinks the body and never the front end, int8
with the front end in float, and the augment stage's record on generated clips."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile
import torch

from pipeline import StageError
from pipeline.modalities.audio import export
from pipeline.modalities.audio import models as audio_models
from pipeline.modalities.audio.augment import augmenter, preprocessing, write_augmented
from pipeline.modalities.audio.logmel import LogMel, mask_bands, mel_filterbank
from pipeline.modalities.audio.perturb import DRAWS, perturb, resample
from pipeline.core.card import onnx_predictor
from pipeline.core.stream import item_keys
from pipeline.core.pruning import structured_l1
from pipeline.stages.compress import count_macs_on, count_params, quantize_int8
from pipeline.core.dataset import write_items
from pipeline.params import load_params
from tests.conftest import merged

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
CLASSES = {"low": 300.0, "mid": 700.0, "high": 1500.0, "top": 3000.0}  # class -> tone Hz
SPLITS = {"train": 24, "val": 4, "test": 8}  # clips per class
# Tiny models, few epochs: a training run takes a few seconds on 2 cores.
AUDIO = {"train": {"n_mels": 16, "width": 8, "max_epochs": 4, "batch_size": 16, "lr": 0.01},
         "augment": {"copies": 1, "time_masks": 1, "freq_masks": 1, "freq_mask_bins": 2}}


def params(**audio):
    """The real params.yaml with AUDIO and then `audio` (subsection -> changes) over its audio
    section."""
    p = load_params(REPO / "params.yaml")
    changes = merged(AUDIO, audio)
    section = dataclasses.replace(p.audio, **{
        sub: dataclasses.replace(getattr(p.audio, sub), **values) for sub, values in changes.items()})
    return dataclasses.replace(p, audio=section)


def clip(hz: float, rng: np.random.Generator) -> np.ndarray:
    """A tone of 0.2-0.6 s at a random level and place in 1 s of light noise."""
    n = int(rng.uniform(0.2, 0.6) * RATE)
    start = rng.integers(0, RATE - n)
    out = rng.normal(0, 0.003, RATE)
    out[start:start + n] += rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * hz * np.arange(n) / RATE
                                                           + rng.uniform(0, 2 * np.pi))
    return out.astype(np.float32)


def write_clips(folder: Path, seed: int) -> Path:
    """An ingested audio data set (the contract's shards), items audio/<split>/<class>/<n>.wav."""
    rng = np.random.default_rng(seed)
    items = []
    for split, per_class in SPLITS.items():
        for label, hz in CLASSES.items():
            for n in range(per_class):
                wav = io.BytesIO()
                soundfile.write(wav, clip(hz, rng), RATE, subtype="PCM_16", format="WAV")
                items.append(({"id": f"audio/{split}/{label}/{n}.wav", "label": label,
                               "split": split, "source": f"generated {seed}"}, wav.getvalue()))
    write_items(folder, items, list(CLASSES))
    return folder


@pytest.fixture(scope="module")
def waves() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([clip(hz, rng) for hz in [*CLASSES.values()] * 4]))


def build(name: str) -> audio_models.AudioClassifier:
    """An untrained model with random batch norms, as trained ones have (fresh ones are all
    zeros and ones: the exporter would share their constants between layers)."""
    p = params()
    torch.manual_seed(0)
    model = audio_models.build(name, preprocessing(p.audio.preprocess), len(CLASSES), p.audio)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for tensor in (m.weight, m.bias, m.running_mean, m.running_var):
                tensor.data.uniform_(0.5, 1.5)
    return model.eval()


# --- the front end -----------------------------------------------------------------------------

def test_front_end_is_torch_stft_and_exports_to_conv_matmul_log(waves, tmp_path):
    p = params().audio.train
    logmel = LogMel(RATE, p.n_fft, p.hop, p.n_mels).eval()
    reference = torch.stft(waves, p.n_fft, p.hop, window=torch.hann_window(p.n_fft),
                           center=True, pad_mode="constant", return_complex=True).abs().square()
    power = logmel.power(waves)
    assert power.shape == reference.shape == (16, p.n_fft // 2 + 1, 1 + RATE // p.hop)
    scale = reference.max()
    assert ((power - reference).abs().max() / scale) < 1e-6
    # Training mode takes torch.stft's FFT for speed: the same features.
    train_power = logmel.train().power(waves)
    assert ((train_power - power).abs().max() / scale) < 1e-6
    # The filterbank: n_mels triangles of peak ~1, centres rising, none empty.
    bank = mel_filterbank(RATE, p.n_fft, p.n_mels)
    assert bank.shape == (p.n_mels, p.n_fft // 2 + 1) and (bank >= 0).all()
    assert (bank.max(1) > 0.5).all() and (np.diff(bank.argmax(1)) >= 0).all()
    # The whole model's graph: the front end is plain ONNX ops, no DFT or STFT op.
    export.export_onnx(build("conv1d"), preprocessing(params().audio.preprocess), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {n.op_type for n in graph.node if n.name.startswith(export.FRONTEND)}
    assert {"Conv", "MatMul", "Log"} <= ops and not ops & {"DFT", "STFT", "MelWeightMatrix"}


def test_spec_augment_masks_bands_in_training_mode_only(waves):
    features = torch.ones(64, 16, 50)
    masked = mask_bands(features, 1, masks=1, max_width=3)
    zero_bands = (masked == 0).all(2).sum(1)  # whole mel bands zeroed, per clip
    assert zero_bands.max() == 3 and zero_bands.min() == 0 and (masked == 0).any(2).sum() \
        == zero_bands.sum()
    masked = mask_bands(features, 2, masks=2, max_width=5)
    assert ((masked == 0).all(1).sum(1) <= 10).all() and (masked == 0).any()
    # In the model: the body sees zeroed frames in training mode, none in eval mode.
    model = build("cnn2d")
    seen = []
    model.body.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model.train()(waves)
        model.eval()(waves)
    assert (seen[0] == 0).all(1).any() and not (seen[1] == 0).all(1).any()


# --- perturbation ------------------------------------------------------------------------------

def draws_and_noise(waves: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return rng.random((len(waves), DRAWS)), torch.from_numpy(
        rng.standard_normal(waves.shape, dtype=np.float32))


def test_each_perturbation_does_what_its_range_says(waves):
    p = params().audio.augment
    fixed = lambda **k: dataclasses.replace(  # noqa: E731
        p, **{"speed": [1, 1], "shift_s": 0.0, "gain_db": [0, 0], "snr_db": [100, 100], **k})
    draws, noise = draws_and_noise(waves)
    torch.testing.assert_close(perturb(waves, fixed(), RATE, draws, noise), waves, atol=1e-4,
                               rtol=0)
    # The draws' columns, in order: speed, shift, gain, SNR, each mapped onto its range.
    half = np.full((len(waves), DRAWS), 0.5)
    louder = perturb(waves, fixed(gain_db=[0, 12]), RATE, half, noise)
    torch.testing.assert_close(louder, waves * 10 ** (6 / 20), atol=1e-4, rtol=0)
    assert perturb(waves, fixed(gain_db=[40, 40]), RATE, draws, noise).abs().max() == 1  # clipped
    noisy = perturb(waves, fixed(snr_db=[0, 20]), RATE, half, noise)
    snr = waves.square().mean(1) / (noisy - waves).square().mean(1)
    assert ((10 * snr.log10() - 10).abs() < 0.5).all()
    later = perturb(waves, fixed(shift_s=10 / RATE), RATE, np.full_like(half, 0.75), noise)
    torch.testing.assert_close(later[:, 5:], waves[:, :-5], atol=1e-4, rtol=0)
    quicker = perturb(waves, fixed(speed=[1, 1.2]), RATE, half, noise)
    torch.testing.assert_close(quicker, resample(waves, torch.full((len(waves), 1), 1.1),
                                                 torch.zeros(len(waves), 1)), atol=1e-4, rtol=0)
    # Shift and speed: output sample t is input sample centre + (t - centre) x rate - shift.
    ones = torch.ones(len(waves), 1)
    torch.testing.assert_close(resample(waves, ones, 5 * ones)[:, 5:], waves[:, :-5])
    assert (resample(waves, ones, 5 * ones)[:, :5] == 0).all()
    tone = torch.sin(2 * torch.pi * 500 * torch.arange(RATE) / RATE).expand(2, RATE)
    faster = resample(tone, torch.tensor([[1.0], [1.2]]), torch.zeros(2, 1))
    assert torch.fft.rfft(faster).abs().argmax(1).tolist() == [500, 600]  # 1 Hz bins


def test_a_clip_is_perturbed_alone_as_in_a_batch(waves):
    """Its own draws and noise alone make a clip's output, bit for bit: the batch's farthest
    reach (resample's zero padding) and its size change nothing."""
    p = params().audio.augment
    draws, noise = draws_and_noise(waves)
    draws[0, :2] = [0.0, 0.0]  # the slowest, farthest shifted clip: the batch's widest margin
    batch = perturb(waves, p, RATE, draws, noise)
    assert not torch.equal(batch, waves) and batch.abs().max() <= 1
    for i in range(1, len(waves)):
        assert torch.equal(perturb(waves[i:i + 1], p, RATE, draws[i:i + 1], noise[i:i + 1])[0],
                           batch[i])
        assert torch.equal(perturb(waves[i:], p, RATE, draws[i:], noise[i:].numpy())[0],
                           batch[i])
    # 3 s clips: past 32,768 samples torch's CPU mean(1) of one row splits it across threads,
    # as it does not a batch's rows; perturb's row sums keep one order.
    long = torch.cat([waves[:4]] * 3, 1)
    draws, noise = draws_and_noise(long)
    batch = perturb(long, p, RATE, draws, noise)
    assert all(torch.equal(perturb(long[i:i + 1], p, RATE, draws[i:i + 1], noise[i:i + 1])[0],
                           batch[i]) for i in range(4))


def test_views_are_each_clips_own_per_epoch_and_view(waves):
    p = params(augment={"copies": 2, "per_epoch": False})
    prep = preprocessing(p.audio.preprocess)
    views = augmenter(p, prep, Path("unused"))
    keys = item_keys(f"audio/train/{n}.wav" for n in range(len(waves)))
    assert views.views == 3 and views.view(waves, keys, 1, 0) is waves
    first = views.view(waves, keys, 1, 1)
    assert first.shape == waves.shape and first.dtype == torch.float32
    assert not torch.equal(first, waves) and first.abs().max() <= 1
    assert torch.equal(first, augmenter(p, prep, Path("unused")).view(waves, keys, 1, 1))
    assert torch.equal(first[3], views.view(waves[3:4], keys[3:4], 1, 1)[0])  # alone
    assert torch.equal(first[3], views.view(waves[[5, 3]], keys[[5, 3]], 1, 1)[1])
    for other in (views.view(waves, keys, 2, 1), views.view(waves, keys, 1, 2),
                  augmenter(params(augment={"copies": 2, "per_epoch": False, "seed": 1}), prep,
                            Path("unused")).view(waves, keys, 1, 1)):
        assert not (other == first).all(1).any()  # every clip differs
    # per_epoch: the clip itself is perturbed too, afresh each epoch.
    each = augmenter(params(augment={"per_epoch": True}), prep, Path("unused"))
    assert each.views == 2
    zero = each.view(waves, keys, 1, 0)
    assert not (zero == waves).all(1).any() and not (zero == each.view(waves, keys, 2, 0)).all(
        1).any()
    # Stored items decode to the model's input as they are.
    wavs = []
    for wave in waves[:2].numpy():
        wav = io.BytesIO()
        soundfile.write(wav, wave, RATE, subtype="FLOAT", format="WAV")
        wavs.append(wav.getvalue())
    decoded = views.decode(wavs)
    assert decoded.dtype == np.float32 and np.array_equal(decoded, waves[:2].numpy())
    assert views.to_input(waves) is waves


# --- models, ONNX, pruning, int8 ---------------------------------------------------------------

def test_unknown_audio_model_names_the_key():
    p = params()
    with pytest.raises(StageError, match=r"audio.train.model: expected one of \['conv1d', 'cnn2d'\], got 'lstm'"):
        audio_models.build("lstm", preprocessing(p.audio.preprocess), 2, p.audio)


@pytest.mark.parametrize("name", sorted(audio_models.MODELS))
def test_pruning_shrinks_the_body_not_the_front_end_and_onnx_agrees(name, waves, tmp_path):
    model, prep = build(name), preprocessing(params().audio.preprocess)
    export.export_onnx(model, prep, tmp_path / "float.onnx")
    predict = onnx_predictor(tmp_path / "float.onnx", threads=1)
    for batch in (waves[:1], waves):
        with torch.no_grad():
            expected = model(batch).numpy()
        got = predict(batch.numpy())
        assert got.shape == (len(batch), len(CLASSES)) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-4)

    example, _ = export.mac_example(prep)
    macs, n_params = count_macs_on(model, example), count_params(model)
    kernels, bank = model.frontend[0].kernels.clone(), model.frontend[0].filterbank.clone()
    widths = structured_l1(model, 0.5, waves[:1])
    convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv1d,
                                                                   torch.nn.Conv2d))]
    assert set(widths) == set(convs) and all(after < before for before, after in widths.values())
    assert torch.equal(model.frontend[0].kernels, kernels)
    assert torch.equal(model.frontend[0].filterbank, bank)
    assert model.frontend[1].num_features == params().audio.train.n_mels
    assert model.body[-1].out_features == len(CLASSES)
    assert count_params(model) < n_params and count_macs_on(model, example) < macs
    export.export_onnx(model, prep, tmp_path / "pruned.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(onnx_predictor(tmp_path / "pruned.onnx", 1)(waves.numpy()),
                                   model(waves).numpy(), atol=1e-4)


@pytest.mark.parametrize("name", sorted(audio_models.MODELS))
def test_int8_keeps_the_front_end_float_and_answers_alone_as_in_a_batch(name, waves, tmp_path):
    """The server's promise: a clip's answer does not depend on the clips sent with it."""
    model, prep = build(name), preprocessing(params().audio.preprocess)
    export.export_onnx(model, prep, tmp_path / "float.onnx")
    calibration = waves.numpy()
    quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx", calibration,
                  per_channel=True, reduce_range=True, export=export)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    frontend = [n for n in graph.node if n.name.startswith(export.FRONTEND)]
    assert frontend and not any(set(n.input) & dequantized for n in frontend)
    body = [n for n in graph.node if n.op_type == "Conv" and n not in frontend]
    assert body and all(set(n.input) & dequantized for n in body)  # the body's convs are int8
    batch = onnx_predictor(tmp_path / "int8.onnx", 1)(waves.numpy())
    alone = np.concatenate([onnx_predictor(tmp_path / "int8.onnx", 1)(w[None].numpy())
                            for w in waves])
    np.testing.assert_allclose(alone, batch, atol=1e-5)
    float_logits = onnx_predictor(tmp_path / "float.onnx", 1)(waves.numpy())
    assert (batch.argmax(1) == float_logits.argmax(1)).mean() >= 0.9


# --- the stages --------------------------------------------------------------------------------

def test_augment_writes_the_preprocessing_record_alone(tmp_path):
    data = write_clips(tmp_path / "ingested", seed=1)
    outputs = []
    for out in ("first", "second"):
        summary = write_augmented(data, tmp_path / out, params())
        outputs.append({f.name: f.read_bytes() for f in sorted((tmp_path / out).iterdir())})
    assert sorted(outputs[0]) == ["preprocessing.json"] and outputs[0] == outputs[1]
    assert summary == ("96 training clips of 16000 samples at 16000 Hz; training sees a "
                       "perturbation of each and 1 perturbed copies per epoch")
    off = write_augmented(data, tmp_path / "off", params(augment={"per_epoch": False}))
    assert "training sees each as it is and 1 perturbed" in off
