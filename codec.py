"""EnCodec: a SEANet auto-encoder with residual vector quantization (RVQ) that turns audio into K parallel
token streams and back (PAPER.md §3.1; PAPER.md "audiocraft: EnCodec and its training"). Modules, parameter
names and numerics follow audiocraft's EncodecModel, so a released `compression_state_dict.bin` loads as is
(keys encoder.model.*, decoder.model.*, quantizer.vq.layers.{k}._codebook.*), and so does transformers' port after
renaming its keys (see the tests).

  python codec.py train --manifest data/toy/train.jsonl --valid data/toy/valid.jsonl --preset toy --out runs/toy/codec
  python codec.py eval --ckpt runs/toy/codec/codec.pt --manifest data/toy/test.jsonl [--json metrics.json]
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data


@dataclass
class CodecConfig:  # defaults: MusicGen's 32 kHz EnCodec, PAPER.md "audiocraft: EnCodec and its training"
    sample_rate: int = 32000
    ratios: tuple = (8, 5, 4, 4)  # decoder (upsampling) order as in audiocraft; the encoder uses them reversed
    n_filters: int = 64  # first width, doubled at each downsampling
    dimension: int = 128  # latent = codebook dimension
    n_residual_layers: int = 1
    lstm: int = 2  # LSTM layers (with skip) after the encoder / before the decoder convs
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2  # residual branches run at dim // compress
    n_q: int = 4  # codebooks K
    bins: int = 2048  # codes per codebook
    decay: float = 0.99  # EMA of the codebooks
    kmeans_iters: int = 50  # k-means init on the first training batch
    threshold_ema_dead_code: float = 2.0  # codes whose EMA count per batch falls below this are re-seeded
    activation: str = "elu"  # "elu" (SEANet, audiocraft) or "snake" (periodic: see Snake)

    def __post_init__(self):
        self.ratios = tuple(int(r) for r in self.ratios)
        if self.activation not in ("elu", "snake"):
            raise ValueError(f"codec config activation {self.activation!r}: expected 'elu' or 'snake'")


CODEC_PRESETS = {
    "musicgen-32khz": CodecConfig(),  # MusicGen's 32 kHz EnCodec, hop 640, 4 x 2048
    "audiogen-16khz": CodecConfig(sample_rate=16000, ratios=(8, 5, 4, 2)),  # AudioGen's, hop 320
    # toy: 16 kHz, 50 Hz frames (hop 320) and K = 4 like the paper, sized for minutes on 2 CPU cores. Ratios in
    # the other order (the encoder strides by 8 first) halve the compute of (8, 5, 4, 2) at this width, and in our
    # runs reached a better mel loss and SI-SNR per step; one LSTM layer. Snake instead of ELU: with ELU the
    # decoder learned the tones' harmonics (the sound type) too slowly for a CPU budget (RESULTS.md "Toy codec").
    "toy": CodecConfig(sample_rate=16000, ratios=(2, 4, 5, 8), n_filters=16, dimension=64, lstm=1, bins=256,
                       activation="snake"),
}
# Training defaults: audiocraft's recipe for the real presets (batch 64 x 1 s, 200 epochs x 2000 updates, with the
# discriminator, mel n_fft 64..1024), a quick CPU recipe for the toy one (no discriminator: it would cost more than
# the codec itself). harmonic_weight: the extra HarmonicSpecLoss term (0: audiocraft's recipe). loud_crops: each
# crop is the louder half of a crop twice as long (the toy clips are ~75 % silence). Toy mel n_fft 256..2048: only
# long windows resolve the harmonics of a 220 Hz tone. Toy L1 weight 0.2 (audiocraft: 0.1): the waveform term keeps
# a tone's period where the mel term alone let some tones come back with a subharmonic buzz that sounds like noise.
# Toy steps: 1200 keep the main job under ~18 minutes on 2 cores (a Snake step costs ~1.4x an ELU one there). Each
# toy choice and its measurement: RESULTS.md "Toy codec".
_PAPER = dict(steps=400_000, batch_size=64, segment_seconds=1.0, adversarial=True, harmonic_weight=0.0,
              loud_crops=False, mel_n_ffts=(64, 128, 256, 512, 1024), l1_weight=0.1)
TRAIN_DEFAULTS = {"musicgen-32khz": _PAPER, "audiogen-16khz": _PAPER,
                  "toy": dict(steps=1200, batch_size=16, segment_seconds=0.5, adversarial=False, harmonic_weight=0.0,
                              loud_crops=True, mel_n_ffts=(256, 512, 1024, 2048), l1_weight=0.2)}


# ----------------------------------------------------------------------------------------------- SEANet
class WNConv(nn.Module):
    """Conv1d / ConvTranspose1d with weight norm, w = g v / ||v|| (norm over all dims but 0). Stored as weight_g /
    weight_v like torch's old nn.utils.weight_norm (deprecated in torch 2.x, whose parametrizations name them
    differently), which is what audiocraft's released state dicts hold."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, transpose=False):
        super().__init__()
        conv = (nn.ConvTranspose1d if transpose else nn.Conv1d)(cin, cout, kernel, stride, dilation=dilation)
        self.stride, self.dilation, self.transpose = stride, dilation, transpose
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(conv.weight.detach(), dim=(1, 2), keepdim=True))
        self.weight_v = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
        self._cached = (None, None)  # (parameter versions, w): inference reuses w until g or v change

    def weight(self):
        if torch.is_grad_enabled():
            return torch._weight_norm(self.weight_v, self.weight_g, 0)  # the kernel nn.utils.weight_norm calls
        key = (self.weight_v._version, self.weight_g._version, self.weight_v.data_ptr(), self.weight_g.data_ptr())
        if self._cached[0] != key:  # an optimizer step / load_state_dict bumps the version
            self._cached = (key, torch._weight_norm(self.weight_v, self.weight_g, 0))
        return self._cached[1]

    def forward(self, x):
        w = self.weight()
        if self.transpose:
            return F.conv_transpose1d(x, w, self.bias, self.stride)
        return F.conv1d(x, w, self.bias, self.stride, dilation=self.dilation)


class SConv1d(nn.Module):
    """audiocraft's StreamableConv1d, non-causal, pad_mode constant: zeros, kernel - stride in total (the extra one
    on the left for odd totals), plus zeros on the right so the last window is full: T_out = ceil(T_in / stride)."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1):
        super().__init__()
        self.conv = nn.ModuleDict({"conv": WNConv(cin, cout, kernel, stride, dilation)})  # keys conv.conv.*
        self.stride, self.pad = stride, (kernel - 1) * dilation + 1 - stride

    def forward(self, x):
        extra = -x.shape[-1] % self.stride  # audiocraft's get_extra_padding_for_conv1d, simplified
        x = F.pad(x, (self.pad - self.pad // 2, self.pad // 2 + extra))
        return self.conv["conv"](x)


class SConvTr1d(nn.Module):
    """audiocraft's StreamableConvTranspose1d, non-causal: trims kernel - stride samples (more on the left)."""

    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.convtr = nn.ModuleDict({"convtr": WNConv(cin, cout, kernel, stride, transpose=True)})
        self.pad = kernel - stride

    def forward(self, x):
        y = self.convtr["convtr"](x)
        return y[..., self.pad - self.pad // 2: y.shape[-1] - self.pad // 2]


class Snake(nn.Module):
    """x + sin²(αx) / α with a learned α per channel: an activation whose output is periodic in x, so stacks of
    them make periodic waveforms -- tones and their harmonics -- easily (BigVGAN, DAC; RESULTS.md "Toy codec")."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):  # (B, C, T)
        return x + torch.sin(self.alpha * x).pow(2) / (self.alpha + 1e-9)


def activation(cfg, channels):
    return Snake(channels) if cfg.activation == "snake" else nn.ELU()


class ResBlock(nn.Module):
    """SEANet residual block: ELU, conv k=3 (dilated) to dim // compress, ELU, conv k=1 back; true (identity) skip."""

    def __init__(self, dim, cfg, dilation):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.Sequential(activation(cfg, dim), SConv1d(dim, hidden, cfg.residual_kernel_size,
                                                                 dilation=dilation),
                                   activation(cfg, hidden), SConv1d(hidden, dim, 1))

    def forward(self, x):
        return x + self.block(x)


class LSTMSkip(nn.Module):
    def __init__(self, dim, layers):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    def forward(self, x):  # (B, C, T)
        x = x.permute(2, 0, 1)  # (T, B, C)
        return (self.lstm(x)[0] + x).permute(1, 2, 0)


class SEANet(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.model = nn.Sequential(*layers)  # keys encoder.model.{i}.*, decoder.model.{i}.*

    def forward(self, x):
        return self.model(x)


def encoder_layers(cfg):
    ch = cfg.n_filters
    layers = [SConv1d(1, ch, cfg.kernel_size)]
    for r in reversed(cfg.ratios):
        layers += [ResBlock(ch, cfg, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
        layers += [activation(cfg, ch), SConv1d(ch, 2 * ch, 2 * r, stride=r)]  # downsample by r, double the width
        ch *= 2
    layers += [LSTMSkip(ch, cfg.lstm)] if cfg.lstm else []
    return layers + [activation(cfg, ch), SConv1d(ch, cfg.dimension, cfg.last_kernel_size)]


def decoder_layers(cfg):
    ch = cfg.n_filters * 2 ** len(cfg.ratios)
    layers = [SConv1d(cfg.dimension, ch, cfg.kernel_size)] + ([LSTMSkip(ch, cfg.lstm)] if cfg.lstm else [])
    for r in cfg.ratios:
        layers += [activation(cfg, ch), SConvTr1d(ch, ch // 2, 2 * r, stride=r)]
        ch //= 2
        layers += [ResBlock(ch, cfg, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
    return layers + [activation(cfg, ch), SConv1d(ch, 1, cfg.last_kernel_size)]  # no final activation, as audiocraft


# ----------------------------------------------------------------------------------------------- RVQ
def sample_vectors(x, n):  # n rows of x (N, D): without replacement when N >= n
    idx = torch.randperm(len(x), device=x.device)[:n] if len(x) >= n else torch.randint(len(x), (n,), device=x.device)
    return x[idx]


def nearest(x, embed):  # (N, D), (C, D) -> (N,); the formula of audiocraft / transformers, so ties break alike
    e = embed.t()
    return (-(x.pow(2).sum(1, keepdim=True) - 2 * x @ e + e.pow(2).sum(0, keepdim=True))).max(dim=-1).indices


def kmeans(x, k, iters):
    means = sample_vectors(x, k)
    for _ in range(iters):
        idx = nearest(x, means)
        bins = torch.bincount(idx, minlength=k)
        new = torch.zeros_like(means).index_add_(0, idx, x) / bins.clamp(min=1)[:, None]
        means = torch.where((bins == 0)[:, None], means, new)  # empty clusters keep their mean
    return means, bins


class Codebook(nn.Module):
    """audiocraft's EuclideanCodebook: codes move by EMA of assigned counts and sums (no gradient). Two deliberate
    departures, both training-only: after k-means init embed_avg = means * counts (audiocraft stores the means,
    which shrinks every code by its count on the first update), and a re-seeded dead code gets matching EMA
    statistics (audiocraft overwrites the re-seeded vector in the same step, so its replacement never takes)."""

    def __init__(self, cfg):
        super().__init__()
        self.decay, self.iters, self.threshold, self.eps = cfg.decay, cfg.kmeans_iters, cfg.threshold_ema_dead_code, 1e-5
        self.register_buffer("inited", torch.zeros(1))
        self.register_buffer("cluster_size", torch.zeros(cfg.bins))
        self.register_buffer("embed", torch.zeros(cfg.bins, cfg.dimension))
        self.register_buffer("embed_avg", torch.zeros(cfg.bins, cfg.dimension))

    @torch.no_grad()
    def init_kmeans(self, x):  # x (N, D): the first training batch (k-means init)
        means, bins = kmeans(x, len(self.embed), self.iters)
        self.embed.copy_(means)
        self.embed_avg.copy_(means * bins[:, None])
        self.cluster_size.copy_(bins)
        self.inited.fill_(1)

    @torch.no_grad()
    def update(self, x, idx):  # x (N, D) this batch's inputs, idx (N,) their codes
        d, K = self.decay, len(self.embed)
        onehot = F.one_hot(idx, K).type(x.dtype)  # (N, K)
        self.cluster_size.mul_(d).add_(onehot.sum(0), alpha=1 - d)
        self.embed_avg.mul_(d).add_(onehot.t() @ x, alpha=1 - d)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing: no division by 0
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        dead = self.cluster_size < self.threshold  # dead-code threshold 2
        if self.threshold > 0 and dead.any():
            self.embed[dead] = sample_vectors(x, int(dead.sum()))  # re-seed on random vectors of this batch
            self.embed_avg[dead] = self.embed[dead] * self.threshold
            self.cluster_size[dead] = self.threshold


class VQLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self._codebook = Codebook(cfg)

    def encode(self, x):  # (B, D, T) -> (B, T)
        B, D, T = x.shape
        return nearest(x.permute(0, 2, 1).reshape(-1, D), self._codebook.embed).view(B, T)

    def decode(self, idx):  # (B, T) -> (B, D, T)
        return F.embedding(idx, self._codebook.embed).permute(0, 2, 1)

    def forward(self, x):  # (B, D, T) -> quantized (B, D, T), codes (B, T), commitment loss
        B, D, T = x.shape
        cb, flat = self._codebook, x.detach().permute(0, 2, 1).reshape(-1, D)
        if self.training and not cb.inited:
            cb.init_kmeans(flat)
        idx = nearest(flat, cb.embed)
        q = self.decode(idx.view(B, T))  # looked up before this batch's EMA update, as audiocraft
        commit = x.new_zeros(())
        if self.training:
            cb.update(flat, idx)
            commit = F.mse_loss(q.detach(), x)  # pulls the encoder to its codes; codebooks move by EMA only
            q = x + (q - x).detach()  # straight-through estimator
        return q, idx.view(B, T), commit


class RVQ(nn.Module):
    """Residual VQ: codebook k quantizes what codebooks < k left over (PAPER.md §3.1)."""

    def __init__(self, cfg):
        super().__init__()
        self.vq = nn.ModuleDict({"layers": nn.ModuleList(VQLayer(cfg) for _ in range(cfg.n_q))})  # vq.layers.{k}

    def forward(self, x):  # (B, D, T) -> (B, D, T), codes (B, K, T), mean commitment over layers
        out, residual, codes, losses = 0.0, x, [], []
        for layer in self.vq["layers"]:
            # with the STE, later residuals carry no gradient: only layer 0's commitment reaches the
            # encoder, exactly as in audiocraft
            q, idx, loss = layer(residual)
            residual, out = residual - q, out + q
            codes.append(idx)
            losses.append(loss)
        return out, torch.stack(codes, 1), torch.stack(losses).mean()

    def encode(self, x):  # (B, D, T) -> (B, K, T)
        residual, codes = x, []
        for layer in self.vq["layers"]:
            codes.append(layer.encode(residual))
            residual = residual - layer.decode(codes[-1])
        return torch.stack(codes, 1)

    def decode(self, codes):  # (B, K, T) -> (B, D, T)
        out = torch.zeros((), device=codes.device)
        for k in range(codes.shape[1]):
            out = out + self.vq["layers"][k].decode(codes[:, k])
        return out


class EncodecModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = SEANet(encoder_layers(cfg)), SEANet(decoder_layers(cfg))
        self.quantizer = RVQ(cfg)
        self.sample_rate, self.hop_length = cfg.sample_rate, math.prod(cfg.ratios)
        self.frame_rate = cfg.sample_rate / self.hop_length
        self.num_codebooks, self.cardinality = cfg.n_q, cfg.bins

    def _check_wav(self, wav):
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"expected mono audio of shape (B, 1, N), got {tuple(wav.shape)}")

    def forward(self, wav):  # (B, 1, N) -> reconstruction (B, 1, N), codes (B, K, T), commitment loss
        self._check_wav(wav)
        q, codes, commit = self.quantizer(self.encoder(wav))
        return self.decoder(q)[..., :wav.shape[-1]], codes, commit

    def encode(self, wav):  # (B, 1, N) -> (B, K, T) int64, T = ceil(N / hop)
        self._check_wav(wav)
        return self.quantizer.encode(self.encoder(wav))

    def decode(self, codes):  # (B, K, T) -> (B, 1, T * hop)
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"expected codes of shape (B, {self.num_codebooks}, T), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cardinality):
            raise ValueError(f"codes must lie in [0, {self.cardinality}), got [{codes.min()}, {codes.max()}]")
        return self.decoder(self.quantizer.decode(codes))


# ----------------------------------------------------------------------------------------------- loading
XP_FIELDS = dict(sample_rate="sample_rate", ratios="seanet.ratios", n_filters="seanet.n_filters",
                 dimension="seanet.dimension", n_residual_layers="seanet.n_residual_layers", lstm="seanet.lstm",
                 kernel_size="seanet.kernel_size", last_kernel_size="seanet.last_kernel_size",
                 residual_kernel_size="seanet.residual_kernel_size", dilation_base="seanet.dilation_base",
                 compress="seanet.compress", n_q="rvq.n_q", bins="rvq.bins", decay="rvq.decay",
                 kmeans_iters="rvq.kmeans_iters", threshold_ema_dead_code="rvq.threshold_ema_dead_code")
XP_REQUIRED = ("sample_rate", "ratios", "n_filters", "dimension", "n_q", "bins")
XP_FIXED = {"channels": 1, "encodec.causal": False, "encodec.renormalize": False, "seanet.norm": "weight_norm",
            "seanet.pad_mode": "constant", "seanet.true_skip": True, "seanet.activation": "ELU",
            "seanet.decoder.final_activation": None}  # what this file builds; anything else is refused


def config_from_xp(xp, path="xp.cfg"):
    """audiocraft's xp.cfg (sample_rate, seanet.*, rvq.*) -> CodecConfig. xp.cfg is a yaml string in exported
    files, or a dict, or an omegaconf DictConfig in older ones (data.xp_config)."""
    xp = data.xp_config(xp, path)

    def get(keys, default):
        node = xp
        for k in keys.split("."):
            if not isinstance(node, dict) or k not in node:
                if default is KeyError:
                    raise ValueError(f"{path}: 'xp.cfg' has no field {keys}")
                return default
            node = node[k]
        if isinstance(node, str) and node.startswith("${") and node.endswith("}"):  # omegaconf interpolation
            return get(node[2:-1], default)
        return node
    for keys, want in XP_FIXED.items():
        if get(keys, want) != want:
            raise ValueError(f"{path}: xp.cfg {keys} = {get(keys, want)!r}; only {want!r} is supported")
    dflt = CodecConfig()
    return CodecConfig(**{name: get(key, KeyError if name in XP_REQUIRED else getattr(dflt, name))
                          for name, key in XP_FIELDS.items()})


def _load_weights(model, sd, path):
    data.check_state_dict(model.state_dict(), sd, path, f"the codec config {model.cfg}")
    model.load_state_dict(sd)
    return model


def _audiocraft_model(pkg, path):
    if "pretrained" in pkg and "best_state" not in pkg:
        raise ValueError(f"{path}: holds no weights, only the name of the pretrained model {pkg['pretrained']!r}")
    if "best_state" not in pkg or "xp.cfg" not in pkg:
        raise ValueError(f"{path}: expected 'best_state' and 'xp.cfg' (audiocraft's compression_state_dict.bin)")
    sd = pkg["best_state"]
    sd = sd["model"] if isinstance(sd.get("model"), dict) else sd  # solver checkpoints nest it once more
    return _load_weights(EncodecModel(config_from_xp(pkg["xp.cfg"], path)), sd, path)


def load_audiocraft(path, device="cpu"):
    """audiocraft's `compression_state_dict.bin` ({'best_state': sd, 'xp.cfg': cfg}) -> EncodecModel (eval)."""
    pkg = data.torch_load(path, "audiocraft compression_state_dict.bin")
    if not isinstance(pkg, dict):
        raise ValueError(f"{path}: expected a dict with 'best_state' and 'xp.cfg', got {type(pkg).__name__}")
    return _audiocraft_model(pkg, path).to(device).eval()


def load_codec(path, device="cpu"):
    """Our checkpoint ({"config": dict, "model": sd}) or an audiocraft compression_state_dict.bin -> model (eval)."""
    pkg = data.torch_load(path, "codec checkpoint")
    if isinstance(pkg, dict) and ("xp.cfg" in pkg or "pretrained" in pkg):
        return _audiocraft_model(pkg, path).to(device).eval()
    if not isinstance(pkg, dict) or not isinstance(pkg.get("config"), dict) or "model" not in pkg:
        raise ValueError(f"{path}: expected a codec.py checkpoint ({{'config', 'model'}}) or an audiocraft "
                         "compression_state_dict.bin ({'best_state', 'xp.cfg'})")
    unknown = pkg["config"].keys() - {f.name for f in fields(CodecConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown codec config fields {sorted(unknown)}")
    try:
        cfg = CodecConfig(**pkg["config"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return _load_weights(EncodecModel(cfg), pkg["model"], path).to(device).eval()


# ----------------------------------------------------------------------------------------------- losses
def mel_filterbank(sr, n_fft, n_mels, f_min, f_max=None, dtype=torch.float32):
    """(n_fft//2+1, n_mels) triangular filters on the HTK mel scale, torchaudio's default (no normalisation)."""
    hz2mel, mel2hz = lambda f: 2595.0 * math.log10(1.0 + f / 700.0), lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=dtype)
    f_pts = mel2hz(torch.linspace(hz2mel(f_min), hz2mel(f_max or sr / 2), n_mels + 2, dtype=dtype))
    slopes = f_pts[None, :] - freqs[:, None]
    down, up = -slopes[:, :-2] / (f_pts[1:-1] - f_pts[:-2]), slopes[:, 2:] / (f_pts[2:] - f_pts[1:-1])
    return torch.clamp(torch.minimum(down, up), min=0.0)


class MultiScaleMelLoss(nn.Module):
    """audiocraft's msspec loss (weight 2): for n_fft = 64 .. 1024 by default (hop n_fft / 4, 64 mels from 64 Hz,
    window-normalized power STFT), L1 on the mel power plus MSE on log10(1e-5 + mel), averaged over the terms."""

    def __init__(self, sample_rate, n_ffts=(64, 128, 256, 512, 1024), n_mels=64, f_min=64.0, floor=1e-5):
        super().__init__()
        self.n_ffts, self.floor = list(n_ffts), floor
        for n in self.n_ffts:
            self.register_buffer(f"fb{n}", mel_filterbank(sample_rate, n, n_mels, f_min), persistent=False)
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def mel(self, x, n):  # (B, 1, N) -> (B, n_mels, frames)
        hop, win = n // 4, getattr(self, f"win{n}")
        x = F.pad(x, ((n - hop) // 2, (n - hop) // 2), mode="reflect")
        x = F.pad(x, (0, (-(x.shape[-1] - n) % hop)))  # full last frame, as audiocraft's pad_for_conv1d
        spec = torch.stft(x.flatten(0, 1), n, hop, window=win, center=False, return_complex=True).abs().pow(2)
        return (getattr(self, f"fb{n}").t() @ (spec / win.pow(2).sum()))

    def forward(self, y, x):
        loss = 0.0
        for n in self.n_ffts:
            my, mx = self.mel(y, n), self.mel(x, n)
            loss = loss + F.l1_loss(my, mx) + F.mse_loss(torch.log10(self.floor + my), torch.log10(self.floor + mx))
        return loss / (2 * len(self.n_ffts))


class HarmonicSpecLoss(nn.Module):
    """The toy recipe's timbre term: L1 between log(floor + |STFT|) of output and reference for long linear-frequency
    STFTs (n_fft 1024 and 2048: 16 and 8 Hz bins, so every harmonic of a 220 Hz tone has bins of its own), the floor
    floor_db below the reference clip's peak magnitude. The mel loss's log term weighs near-empty bins (the gaps
    between events, the noise floor) as much as the harmonics; here what lies well below the floor adds little, and
    the harmonic series -- a tone's timbre -- drives the term."""

    def __init__(self, n_ffts=(1024, 2048), floor_db=40.0):
        super().__init__()
        self.n_ffts, self.floor = n_ffts, 10 ** (-floor_db / 20)
        for n in n_ffts:
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def forward(self, y, x):  # (B, 1, N) each
        loss = 0.0
        for n in self.n_ffts:
            win = getattr(self, f"win{n}")
            mx, my = (torch.stft(v.flatten(0, 1), n, n // 4, window=win, return_complex=True).abs() for v in (x, y))
            floor = self.floor * mx.amax(dim=(1, 2), keepdim=True).clamp(min=1e-8)  # (B, 1, 1)
            loss = loss + (torch.log(floor + my) - torch.log(floor + mx)).abs().mean()
        return loss / len(self.n_ffts)


class STFTDiscriminator(nn.Module):
    """One scale of audiocraft's MS-STFT discriminator: convs over (time, freq) of the complex STFT."""

    def __init__(self, n_fft, hop, filters=32):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.n_fft, self.hop = n_fft, hop
        self.convs = nn.ModuleList([nn.Conv2d(2, filters, (3, 9), padding=(1, 4))] + [
            wn(nn.Conv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))) for d in (1, 2, 4)]
            + [wn(nn.Conv2d(filters, filters, (3, 3), padding=(1, 1)))])
        self.post = wn(nn.Conv2d(filters, 1, (3, 3), padding=(1, 1)))
        self.register_buffer("win", torch.hann_window(n_fft), persistent=False)

    def forward(self, x):  # (B, 1, N) -> logits, feature maps
        z = torch.stft(x.flatten(0, 1), self.n_fft, self.hop, window=self.win, center=False, return_complex=True)
        z = z / self.win.pow(2).sum().sqrt()
        z = torch.stack([z.real, z.imag], 1).transpose(2, 3)  # (B, 2, frames, freqs)
        fmaps = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.3)
            fmaps.append(z)
        return self.post(z), fmaps


class MSSTFTDiscriminator(nn.Module):
    def __init__(self, filters=32, n_ffts=(1024, 2048, 512, 256, 128)):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, n // 4, filters) for n in n_ffts)

    def forward(self, x):
        return [d(x) for d in self.discs]


def adversarial_losses(disc, y, x):
    """Generator side, audiocraft's hinge loss + L1 feature matching, both averaged over the sub-discriminators."""
    fake = disc(y)
    with torch.no_grad():
        real = disc(x)
    adv = sum(-lf.mean() for lf, _ in fake) / len(fake)
    feat = sum(sum(F.l1_loss(a, b) for a, b in zip(ff, fr)) / len(ff) for (_, ff), (_, fr) in zip(fake, real))
    return adv, feat / len(fake)


def discriminator_loss(disc, y, x):  # hinge: real logits pushed above 1, fake below -1
    out = [F.relu(1 - lr).mean() + F.relu(1 + lf).mean() for (lf, _), (lr, _) in zip(disc(y.detach()), disc(x))]
    return sum(out) / len(out)


class Balancer:
    """audiocraft's loss balancer: each loss's gradient with respect to the decoder output y is rescaled by its
    EMA-averaged per-item norm, so loss i supplies weight_i / sum(weights) of a unit gradient; the weights are
    then fractions of the gradient, independent of the losses' scales."""

    def __init__(self, weights, decay=0.999):
        self.weights, self.decay, self.total, self.fix = weights, decay, {}, {}

    def backward(self, losses, y):
        grads, wsum, out = {}, sum(self.weights[k] for k in losses), torch.zeros_like(y)
        for name, loss in losses.items():
            grads[name], = torch.autograd.grad(loss, [y], retain_graph=True)
            norm = grads[name].flatten(1).norm(dim=1).mean().item()
            self.total[name] = self.total.get(name, 0.0) * self.decay + norm
            self.fix[name] = self.fix.get(name, 0.0) * self.decay + 1.0
        for name in losses:
            out.add_(grads[name], alpha=self.weights[name] / wsum / (1e-12 + self.total[name] / self.fix[name]))
        y.backward(out)


def si_snr(y, x, eps=1e-8):  # (..., N) -> (...) dB, scale-invariant SNR of estimate y against reference x
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    proj = (y * x).sum(-1, keepdim=True) / (x.pow(2).sum(-1, keepdim=True) + eps) * x
    return 10 * torch.log10(proj.pow(2).sum(-1) / ((y - proj).pow(2).sum(-1) + eps) + eps)


# ----------------------------------------------------------------------------------------------- training
LOSS_WEIGHTS = dict(msspec=2.0, adv=4.0, feat=4.0)  # + l1 (TRAIN_DEFAULTS); commitment (weight 1) is outside


def loudest_window(wav, n, stride=160):  # (B, 1, N) -> (B, 1, n): each clip's n-sample window of most energy
    c = F.pad(wav.pow(2).cumsum(-1), (1, 0))  # (B, 1, N + 1)
    starts = torch.arange(0, wav.shape[-1] - n + 1, stride)
    best = starts[(c[..., starts + n] - c[..., starts]).argmax(-1)]  # (B, 1)
    return torch.stack([w[..., s:s + n] for w, s in zip(wav, best.flatten().tolist())])


def _batch(ds, step, batch_size, seed):
    """Batch `step` of a seeded per-epoch shuffle: a function of (seed, step) only, so a resumed run sees the same
    data (the dataset's crops are a function of (seed, epoch, item))."""
    epoch, b = divmod(step, max(1, len(ds) // batch_size))
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    perm = perm.repeat(math.ceil(batch_size / len(ds)))  # tiny datasets: items repeat within a batch
    ds.set_epoch(epoch)
    return data.collate([ds[int(i)] for i in perm[b * batch_size:(b + 1) * batch_size]])


@torch.no_grad()
def validate(model, ds, msspec, max_items=32, batch_size=16):  # mean l1, msspec, SI-SNR of eval-mode round trips
    model.eval()
    out, device = dict(l1=0.0, msspec=0.0, si_snr=0.0), next(model.parameters()).device
    for i in range(0, min(len(ds), max_items), batch_size):
        x = data.collate([ds[j] for j in range(i, min(len(ds), max_items, i + batch_size))])["wav"].to(device)
        y, w = model(x)[0], len(x) / min(len(ds), max_items)
        out = dict(l1=out["l1"] + w * F.l1_loss(y, x).item(), msspec=out["msspec"] + w * msspec(y, x).item(),
                   si_snr=out["si_snr"] + w * si_snr(y, x).mean().item())
    model.train()
    return out


def train_codec(manifest, out, valid=None, preset="toy", steps=None, batch_size=None, segment_seconds=None,
                lr=3e-4, adversarial=None, resume=False, seed=0, device="cpu", eval_every=200, save_every=200,
                threads=None, progress=True, harmonic_weight=None):
    """Train an EnCodec with audiocraft's recipe (PAPER.md "audiocraft: EnCodec and its training"): Adam 3e-4
    (0.5, 0.9), 1 s random crops, balanced L1 (0.1) + multi-scale mel (2) [+ MS-STFT discriminator: hinge
    adversarial (4) + feature matching (4)], plus the commitment loss; the toy preset departs from it as
    TRAIN_DEFAULTS says. Writes out/codec.pt ({"config", "model", ...} for load_codec) and the resumable
    out/codec_state.pt; steps / batch_size / segment_seconds / adversarial None take TRAIN_DEFAULTS[preset];
    threads: torch CPU threads while training (restored after). harmonic_weight (None: the preset's) adds
    HarmonicSpecLoss to the balanced losses. resume=True on a finished run returns at once. Returns codec.pt's
    path."""
    if preset not in CODEC_PRESETS:
        raise ValueError(f"unknown codec preset {preset!r}; expected one of {sorted(CODEC_PRESETS)}")
    dflt = TRAIN_DEFAULTS[preset]
    steps, batch_size = steps or dflt["steps"], batch_size or dflt["batch_size"]
    adversarial = dflt["adversarial"] if adversarial is None else adversarial
    harmonic_weight = dflt["harmonic_weight"] if harmonic_weight is None else harmonic_weight
    segment_seconds = segment_seconds or dflt["segment_seconds"]
    loud_crops, mel_n_ffts = dflt["loud_crops"], dflt["mel_n_ffts"]
    cfg = replace(CODEC_PRESETS[preset])
    torch.manual_seed(seed)
    model = EncodecModel(cfg).to(device).train()
    crop = int(round(segment_seconds * cfg.sample_rate))
    ds = data.AudioTextDataset(manifest, cfg.sample_rate, segment_seconds * (2 if loud_crops else 1),
                               random_crop=True, seed=seed)
    vds = data.AudioTextDataset(valid, cfg.sample_rate, None, random_crop=False) if valid else None
    msspec = MultiScaleMelLoss(cfg.sample_rate, mel_n_ffts).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    disc = MSSTFTDiscriminator().to(device) if adversarial else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if adversarial else None
    weights = dict(LOSS_WEIGHTS, l1=dflt["l1_weight"])
    weights = {k: w for k, w in weights.items() if adversarial or k in ("l1", "msspec")}
    harmonic = HarmonicSpecLoss().to(device) if harmonic_weight > 0 else None
    balancer = Balancer(dict(weights, harmonic=harmonic_weight) if harmonic else weights)
    ckpt_path, state_path = os.path.join(out, "codec.pt"), os.path.join(out, "codec_state.pt")
    run = dict(preset=preset, steps=steps, batch_size=batch_size, segment_seconds=segment_seconds, lr=lr,
               adversarial=adversarial, harmonic_weight=harmonic_weight, loud_crops=loud_crops, mel_n_ffts=mel_n_ffts,
               l1_weight=dflt["l1_weight"], seed=seed, manifest=os.path.abspath(manifest))
    start, elapsed, threads_before = 0, 0.0, torch.get_num_threads()
    torch.set_num_threads(threads or threads_before)
    if resume and os.path.exists(state_path):
        st = data.torch_load(state_path, "codec training state")
        saved = (st["run"]["adversarial"], st["run"].get("harmonic_weight", 0.0))
        if st["config"] != asdict(cfg) or saved != (adversarial, harmonic_weight):
            raise ValueError(f"{state_path}: trained with config {st['config']} (adversarial, harmonic weight "
                             f"{saved}), not preset {preset!r} ({adversarial}, {harmonic_weight})")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        balancer.__dict__.update(st["balancer"])
        if disc is not None:
            disc.load_state_dict(st["disc"])
            opt_d.load_state_dict(st["opt_d"])
        torch.set_rng_state(st["rng"].cpu())
        start, elapsed = st["step"], st["elapsed"]
        print(f"resuming {state_path} at step {start}")
    pbar = tqdm(range(start, steps), initial=start, total=steps, desc="codec", disable=not progress)
    for step in pbar:
        t0 = time.time()
        x = _batch(ds, step, batch_size, seed)["wav"]  # (B, 1, N)
        x = (loudest_window(x, crop) if loud_crops else x).to(device)
        y, codes, commit = model(x)
        logs = {}
        if disc is not None:  # the discriminator's step first, on this batch (audiocraft's order)
            d_loss = discriminator_loss(disc, y, x)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            logs["d"] = d_loss.item()
        losses = dict(l1=F.l1_loss(y, x), msspec=msspec(y, x))
        if harmonic is not None:
            losses["harmonic"] = harmonic(y, x)
        if disc is not None:
            losses["adv"], losses["feat"] = adversarial_losses(disc, y, x)
        opt.zero_grad(set_to_none=True)
        commit.backward(retain_graph=True)  # weight 1, outside the balancer (audiocraft's "penalty")
        balancer.backward(losses, y)
        opt.step()
        elapsed += time.time() - t0
        logs.update({k: v.item() for k, v in losses.items()}, commit=commit.item())
        pbar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        done = step + 1
        if vds is not None and (done % eval_every == 0 or done == steps):
            v = validate(model, vds, msspec)
            tqdm.write(f"step {done}: valid l1 {v['l1']:.4f}  msspec {v['msspec']:.4f}  si-snr {v['si_snr']:.2f} dB")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "codec_metrics.jsonl"), "a") as f:
                f.write(json.dumps(dict(step=done, train_seconds=round(elapsed, 1), train=logs, valid=v)) + "\n")
        if done % save_every == 0 or done == steps:
            meta = dict(config=asdict(cfg), model=model.state_dict(), step=done, train_seconds=round(elapsed, 1),
                        run=run)
            data.atomic_save(meta, ckpt_path)
            data.atomic_save(dict(meta, opt=opt.state_dict(), balancer=dict(balancer.__dict__), elapsed=elapsed,
                                  disc=disc and disc.state_dict(), opt_d=opt_d and opt_d.state_dict(),
                                  rng=torch.get_rng_state()), state_path)
    torch.set_num_threads(threads_before)
    return ckpt_path


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_codec(model, manifest, batch_size=16, max_items=None, progress=True):
    """Round trips decode(encode(x)) of a manifest's clips: mean SI-SNR (dB), mean multi-scale mel distance (the
    msspec loss) and codebook usage (perplexity of each codebook's code histogram: bins if used uniformly)."""
    ds = data.AudioTextDataset(manifest, model.sample_rate, None, random_crop=False)
    n, device = len(ds) if max_items is None else min(len(ds), max_items), next(model.parameters()).device
    msspec = MultiScaleMelLoss(model.sample_rate).to(device)
    counts, snrs, mels = torch.zeros(model.num_codebooks, model.cardinality), [], []
    for i in tqdm(range(0, n, batch_size), desc="codec eval", disable=not progress):
        b = data.collate([ds[j] for j in range(i, min(n, i + batch_size))])
        x = b["wav"].to(device)
        codes = model.encode(x)  # (B, K, T)
        y = model.decode(codes)[..., :x.shape[-1]]
        for j, length in enumerate(b["mask"].sum(1).tolist()):  # each clip without its batch padding
            snrs.append(si_snr(y[j, 0, :length], x[j, 0, :length]).item())
            mels.append(msspec(y[j:j + 1, :, :length], x[j:j + 1, :, :length]).item())
            for k, code in enumerate(codes[j, :, :math.ceil(length / model.hop_length)].cpu()):
                counts[k] += torch.bincount(code, minlength=model.cardinality)
    p = counts / counts.sum(1, keepdim=True)
    ppl = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum(1))
    return dict(manifest=manifest, n_items=n, si_snr_db=sum(snrs) / n, mel_distance=sum(mels) / n,
                perplexity=[round(v, 2) for v in ppl.tolist()], codes_used=(counts > 0).sum(1).tolist(),
                cardinality=model.cardinality)


def main(argv=None):
    ap = argparse.ArgumentParser(description="EnCodec (SEANet + RVQ) compression model: train or evaluate.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a codec on a manifest")
    tr.add_argument("--manifest", required=True, help="training manifest (JSONL, see data.py)")
    tr.add_argument("--valid", help="validation manifest (evaluated every --eval-every steps)")
    tr.add_argument("--preset", default="toy", choices=sorted(CODEC_PRESETS), help="model preset")
    tr.add_argument("--out", required=True, help="output directory: codec.pt, codec_state.pt, codec_metrics.jsonl")
    tr.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    tr.add_argument("--batch-size", type=int, help="clips per step (default: the preset's)")
    tr.add_argument("--segment-seconds", type=float, help="random crop length (default: the preset's; audiocraft: 1 s)")
    tr.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    tr.add_argument("--adversarial", action=argparse.BooleanOptionalAction, default=None,
                    help="MS-STFT discriminator losses (default: off for toy, on for the real presets)")
    tr.add_argument("--harmonic-weight", type=float, help="weight of the toy recipe's HarmonicSpecLoss in the "
                    "balancer (default: the preset's; 0 = audiocraft's recipe)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/codec_state.pt if it exists")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--eval-every", type=int, default=200, help="validate every N steps")
    tr.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    ev = sub.add_parser("eval", help="SI-SNR, mel distance and codebook usage of round trips on a manifest")
    ev.add_argument("--ckpt", required=True, help="codec.pt of `codec.py train`, or a compression_state_dict.bin")
    ev.add_argument("--manifest", required=True, help="manifest of the clips to round-trip (e.g. the test split)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-items", type=int, help="only the first N clips")
    ev.add_argument("--json", help="also write the numbers to this JSON file")
    for p in (tr, ev):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a busy 2-core machine)")
    args = ap.parse_args(argv)
    try:
        for name in ("steps", "batch_size", "segment_seconds", "eval_every", "save_every", "max_items", "threads"):
            if getattr(args, name, None) is not None and getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if getattr(args, "harmonic_weight", None) is not None and not args.harmonic_weight >= 0:
            raise ValueError(f"--harmonic-weight must be >= 0, got {args.harmonic_weight}")
        if args.cmd == "train":
            print("wrote", train_codec(args.manifest, args.out, args.valid, args.preset, args.steps, args.batch_size,
                                       args.segment_seconds, args.lr, args.adversarial, args.resume, args.seed,
                                       args.device, args.eval_every, args.save_every, args.threads,
                                       harmonic_weight=args.harmonic_weight))
            return
        if args.threads:
            torch.set_num_threads(args.threads)
        r = evaluate_codec(load_codec(args.ckpt, args.device), args.manifest, args.batch_size, args.max_items)
        print(f"codec {args.ckpt} on {r['manifest']} ({r['n_items']} clips, round trips)\n"
              f"  SI-SNR                     {r['si_snr_db']:8.2f} dB\n"
              f"  multi-scale mel distance   {r['mel_distance']:8.4f}\n"
              f"  codebook   perplexity   codes used / {r['cardinality']}")
        for k, (p, u) in enumerate(zip(r["perplexity"], r["codes_used"])):
            print(f"  {k:8d}   {p:10.1f}   {u:10d}")
        if args.json:
            data.atomic_write(args.json, json.dumps(dict(r, ckpt=args.ckpt), indent=2) + "\n")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
