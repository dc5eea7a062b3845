"""Evaluation of controllability on the toy sound set, and the toy reproduction of the paper's ablation.

The paper (PAPER.md §4) measures FAD (VGGish), KL of PaSST label posteriors and the CLAP text-audio score.
Those need weights this project does not ship, so on the toy set, where the truth is known exactly, we use:
  * an attribute *oracle* built from signal processing only (no learned model): number of events,
    pitch class (low / mid / high = 220 / 440 / 880 Hz) and sound type (sine / square / sawtooth / noise);
  * control accuracy of generated clips vs their prompt's attributes (count, pitch, type, all three),
    split into seen and held-out attribute combinations;
  * the metric trio, toy edition:
      fd    Frechet distance between Gaussians fit to a fixed log-mel statistics embedding (below)
            of generated and reference clips -- the FAD recipe with a deterministic embedding;
      kl    mean over prompts of KL(p_ref || p_gen), p = smoothed histogram of the oracle's combo label
            (30 combos + "other") -- paired per prompt like audiocraft's PaSST KL;
      agree text-audio agreement: mean over clips of the fraction of the prompt's attributes the oracle
            finds (pitch only for tonal prompts) -- the CLAP score's role.
Usage:
  python evaluate.py --oracle-check [--codec runs/toy/codec/codec.pt]   # oracle accuracy on clips / round trips
  python evaluate.py --ckpt runs/toy [--samples-per-prompt 4] [--json out.json]
  python evaluate.py --ablation [--ablation-steps 300 --seeds 0 1 2]    # toy Table 1 (LM only; reuses runs/toy's
                                                                         # codec and T5), see RESULTS.md
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import codec as codec_lib
import data
import sample

SR = data.SAMPLE_RATE  # the toy set's rate, which the oracle's thresholds assume
SILENCE_RMS = 1e-3  # frame RMS below -60 dBFS everywhere = no events


# ----------------------------------------------------------------------------- the oracle
def _frames(x, frame, hop):
    """(N,) -> (F, frame) strided view, zero padded at the end."""
    n = max(len(x), frame)
    n_frames = 1 + math.ceil((n - frame) / hop)
    x = np.pad(x, (0, (n_frames - 1) * hop + frame - len(x)))
    return np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]


def find_events(x, sr=SR):
    """Energy envelope with smoothing and hysteresis -> list of (start, end) sample indices."""
    hop = sr // 100  # 10 ms
    env = np.sqrt((_frames(x, 2 * hop, hop) ** 2).mean(1))  # (F,) 20 ms RMS
    env = np.convolve(env, np.ones(3) / 3, mode="same")  # 30 ms smoothing against codec flutter
    peak = env.max() if len(env) else 0.0
    if peak < SILENCE_RMS:
        return []
    db = 20 * np.log10(env + 1e-9)
    peak_db = db.max()
    floor_db = max(np.percentile(db, 10), peak_db - 80)  # codec hiss in the gaps raises the floor
    on = max(peak_db - 20, floor_db + 0.5 * (peak_db - floor_db))  # hysteresis: enter above `on` ...
    off = on - 6  # ... leave below `off`
    segs, start = [], None
    for i, v in enumerate(db):
        if start is None and v > on:
            start = i
        elif start is not None and v < off:
            segs.append([start, i]); start = None
    if start is not None:
        segs.append([start, len(db)])
    merged = []
    for s, e in segs:  # gaps < 50 ms are one event (codec smearing); events < 40 ms are clicks
        if merged and s - merged[-1][1] < 5:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    return [(s * hop, e * hop) for s, e in merged if e - s >= 4]


def _spectrum(x, events, sr):
    """Mean magnitude spectrum over the event regions (Hann 64 ms, zero-padded to 4096): (freqs, mag)."""
    win, nfft = 1024, 4096
    parts = [x[s:e] for s, e in events]
    frames = [f for p in parts for f in _frames(p, win, win // 4)]
    frames = np.stack(frames) * np.hanning(win)
    mag = np.sqrt((np.abs(np.fft.rfft(frames, nfft, axis=1)) ** 2).mean(0))
    return np.fft.rfftfreq(nfft, 1 / sr), mag


def _peak_near(freqs, mag, f, rel=0.03):
    sel = (freqs > f * (1 - rel)) & (freqs < f * (1 + rel))
    return mag[sel].max() if sel.any() else 0.0


# The oracle's thresholds on sound type. Each sits between the two classes it separates, at the midpoint of their
# extreme values (on a log scale: dB, or the geometric mean of ratios) over clean toy clips and the same clips
# through degrade(), oracle_statistics(range(10, 40)); no model's output was looked at (RESULTS.md "Oracle
# accuracy"; test_oracle_thresholds_separate_clean_and_damaged_clips re-measures the separation).
NOISE_PEAKINESS_DB = 20.5  # spectral peak above its neighbourhood: noise <= 12.8 dB, tones >= 28.3 dB
SINE_UPPER = 0.095         # harmonics >= 2 relative to the fundamental: sine <= 0.040, square / sawtooth >= 0.225
SAW_EVEN_ODD = 0.042       # even / odd harmonic power: square <= 0.003, sawtooth >= 0.584


def analyse_clip(x, sr=SR):
    """The toy attribute oracle. Returns dict(count, pitch, kind, f0, peakiness, harmonic_fraction, upper,
    even_odd); pitch None for noise.

    count: events of the energy envelope.  kind: noise if the spectrum has no peak standing out of its
    neighbourhood (peakiness < NOISE_PEAKINESS_DB), else from the harmonic amplitudes a_h at h*f0: sine =
    fundamental only (upper < SINE_UPPER), square = odd harmonics only, sawtooth = all harmonics (~1/n)
    (even_odd > SAW_EVEN_ODD). harmonic_fraction (power near harmonics of f0) is reported, not used: damaged
    sines and noise overlap on it. f0: subharmonic summation (weights 0.8^(h-1)) over 150-1300 Hz; pitch =
    nearest of 220/440/880 Hz."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    events = find_events(x, sr)
    out = dict(count=len(events), pitch=None, kind=None, f0=None, peakiness=None, harmonic_fraction=None,
               upper=None, even_odd=None)
    if not events:
        return out
    freqs, mag = _spectrum(x, events, sr)
    band = (freqs > 100) & (freqs < min(7000, sr / 2 - 200))
    p = mag[band] ** 2
    local = np.median(np.lib.stride_tricks.sliding_window_view(np.pad(p, 25, mode="edge"), 51), axis=1)
    out["peakiness"] = float(10 * np.log10((p / (local + 1e-20)).max()))
    if out["peakiness"] < NOISE_PEAKINESS_DB:
        out["kind"] = "noise"
        return out
    grid = np.arange(150.0, 1300.0, 1.0)
    m = np.maximum.reduce([np.roll(mag, k) for k in range(-8, 9)])  # +-31 Hz max filter: tolerate detuning
    score = sum(0.8 ** (h - 1) * np.interp(h * grid, freqs, m, right=0.0) for h in range(1, 9))
    f0 = float(grid[score.argmax()])  # the max filter leaves a plateau: refine on the fundamental's own peak
    near = (freqs > 0.95 * f0) & (freqs < 1.05 * f0 + 31)
    f0 = float(freqs[near][mag[near].argmax()])
    harm = np.zeros(band.sum(), bool)  # bins within +-2% (>= 25 Hz) of a harmonic of f0
    for h in range(1, int(freqs[band][-1] / f0) + 1):
        harm |= np.abs(freqs[band] - h * f0) < max(0.02 * h * f0, 25.0)
    out["harmonic_fraction"] = float(p[harm].sum() / p.sum())
    out["f0"] = f0
    out["pitch"] = min(data.PITCH_HZ, key=lambda k: abs(math.log2(f0 / data.PITCH_HZ[k])))
    a = np.array([_peak_near(freqs, mag, h * f0) for h in range(1, 11) if h * f0 < sr / 2 - 300])
    a = a / (a[0] + 1e-12)  # a[h-1] = amplitude of harmonic h relative to the fundamental
    even, odd = (a[1::2] ** 2).sum(), (a[2::2] ** 2).sum()
    out["upper"], out["even_odd"] = float(math.sqrt((a[1:] ** 2).sum())), float(even / (odd + 1e-12))
    if out["upper"] < SINE_UPPER:  # ideal: square 0.48, sawtooth 0.8 (1/n amplitudes)
        out["kind"] = "sine"
    else:  # ideal: square even/odd = 0, sawtooth 1.8
        out["kind"] = "sawtooth" if out["even_odd"] > SAW_EVEN_ODD else "square"
    return out


def degrade(x, rng, snr_db=20.0):
    """Codec-like damage, the oracle's robustness test: a short noisy reverb tail, a 6 kHz low-pass and hiss at
    snr_db below the events."""
    ir = rng.standard_normal(1600) * np.exp(-np.arange(1600) / 400.0)
    y = x + np.convolve(x, ir * 0.3 / np.sqrt((ir ** 2).sum()))[:len(x)]
    spec = np.fft.rfft(y)
    spec[np.fft.rfftfreq(len(y), 1 / SR) > 6000] = 0
    y = np.fft.irfft(spec, len(y))
    power = (y[np.abs(y) > 1e-3] ** 2).mean()
    return y + rng.standard_normal(len(y)) * np.sqrt(power) * 10 ** (-snr_db / 20)


def oracle_statistics(seeds=range(10, 40)):
    """{(kind, 'clean' | 'damaged'): {statistic: (min, max)}} of peakiness, upper and even_odd over fresh clips of
    every attribute combination, clean and through degrade(): what the type thresholds are set from."""
    values = {}
    for seed in seeds:
        rng, damage = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
        for c in data.ALL_COMBOS:
            x = data.synth_clip(c["count"], c["pitch"], c["kind"], rng)
            for cond, y in (("clean", x), ("damaged", degrade(x, damage))):
                a = analyse_clip(y)
                for key in ("peakiness", "upper", "even_odd"):
                    if a[key] is not None:
                        values.setdefault((c["kind"], cond), {}).setdefault(key, []).append(a[key])
    return {k: {s: (min(v), max(v)) for s, v in d.items()} for k, d in values.items()}


def combo_label(attrs):
    """(count, pitch, kind) of an attribute dict; 'other' when outside the toy set (no events, > 3 ...)."""
    count, pitch, kind = attrs.get("count"), attrs.get("pitch"), attrs.get("kind")
    if kind == "noise":
        pitch = None
    ok = count in data.COUNTS and kind in data.KINDS and (kind == "noise") == (pitch is None)
    return (count, pitch, kind) if ok and (pitch is None or pitch in data.PITCH_HZ) else "other"


# ----------------------------------------------------------------------------- the metric trio, toy edition
def embed_clip(x, sr=SR):
    """The fixed embedding of the toy Frechet distance: log(mel power + 1e-3) (32 bands, 32 ms Hann, 10 ms hop),
    then per 0.5 s window (hop 0.25 s) the mean and std of each band over its frames -> (W, 64). Like VGGish in
    FAD (0.96 s patches) it embeds short patches, and the Frechet statistics are taken over all patches of all clips."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    frames = _frames(x, 512, sr // 100) * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (F, 257)
    mel = codec_lib.mel_filterbank(sr, 512, 32, 50.0, 7600.0, dtype=torch.float64).numpy()  # (257, 32)
    logmel = np.log(power @ mel + 1e-3)  # (F, 32); floor ~60 dB below a 0.3-peak tone
    wins = [logmel[s:s + 50] for s in range(0, max(1, len(logmel) - 49), 25)]
    return np.stack([np.concatenate([w.mean(0), w.std(0)]) for w in wins])


def frechet_distance(emb_a, emb_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fit to (n, d) embeddings."""
    mu_a, mu_b = emb_a.mean(0), emb_b.mean(0)
    cov_a, cov_b = np.cov(emb_a, rowvar=False), np.cov(emb_b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)  # same spectrum as S_a S_b, but symmetric
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt))


def _label_dist(labels, alpha):
    keys = [combo_label(c) for c in data.ALL_COMBOS] + ["other"]
    counts = Counter(labels)
    p = np.array([counts.get(k, 0) + alpha for k in keys], dtype=np.float64)
    return p / p.sum()


def paired_kl(ref_labels, gen_labels, alpha=0.1):
    """Mean over prompts of KL(p_ref || p_gen) over the 30 combos + 'other', add-alpha smoothed."""
    kls = []
    for r, g in zip(ref_labels, gen_labels):
        p, q = _label_dist([r], alpha), _label_dist(g, alpha)
        kls.append(float((p * np.log(p / q)).sum()))
    return float(np.mean(kls))


def control(prompts, analyses):
    """Accuracy of count / pitch (tonal prompts only) / kind / all three, and the agreement score
    (fraction of the prompt's applicable attributes the oracle finds, averaged over clips)."""
    rows = dict(count=[], pitch=[], kind=[], all=[], agree=[])
    for want, got in zip(prompts, analyses):
        hits = [got["count"] == want["count"], got["kind"] == want["kind"]]
        rows["count"].append(hits[0]); rows["kind"].append(hits[1])
        if want["kind"] != "noise":
            hits.append(got["pitch"] == want["pitch"]); rows["pitch"].append(hits[2])
        rows["all"].append(all(hits)); rows["agree"].append(sum(hits) / len(hits))
    return {("acc_" + k if k != "agree" else k): (float(np.mean(v)) if v else float("nan")) for k, v in rows.items()}


def score(items, generated, sr=SR):
    """items: list of dict(attributes=..., wav=reference (N,)); generated: per item a list of (N,) clips.
    Returns {split: metrics} for split in all / seen / held_out (fd and kl use the split's own clips)."""
    ref_an = [analyse_clip(it["wav"], sr) for it in items]
    gen_an = [[analyse_clip(g, sr) for g in gens] for gens in generated]
    ref_emb = [embed_clip(it["wav"], sr) for it in items]
    gen_emb = [[embed_clip(g, sr) for g in gens] for gens in generated]
    out = {}
    for split in ("all", "seen", "held_out"):
        idx = [i for i, it in enumerate(items)
               if split == "all" or bool(it["attributes"].get("held_out")) == (split == "held_out")]
        if not idx:
            continue
        prompts = [items[i]["attributes"] for i in idx for _ in generated[i]]
        m = dict(n_prompts=len(idx), n_clips=len(prompts), **control(prompts, [a for i in idx for a in gen_an[i]]))
        m["kl"] = paired_kl([combo_label(ref_an[i]) for i in idx], [[combo_label(a) for a in gen_an[i]] for i in idx])
        m["fd"] = frechet_distance(np.concatenate([ref_emb[i] for i in idx]),
                                   np.concatenate([e for i in idx for e in gen_emb[i]]))
        out[split] = m
    return out


# ----------------------------------------------------------------------------- oracle check, generation
def _split_manifest(data_root, split="test"):
    """A toy split's manifest; made with data.ensure_toy_dataset only when missing (never re-made: a run's
    data may use other sizes than the defaults)."""
    path = os.path.join(data_root, f"{split}.jsonl")
    return path if os.path.exists(path) else data.ensure_toy_dataset(data_root)[split]


def _load_items(manifest, max_items=None):
    items, _ = data.read_manifest(manifest)
    items = [it for it in items if it.get("attributes")][:max_items]
    if not items:
        raise SystemExit(f"{manifest}: no items with 'attributes' (the toy set's manifests have them)")
    for it in items:
        wav, sr = sf.read(it["path"], dtype="float32", always_2d=True)
        if sr != SR:
            raise SystemExit(f"{it['path']}: sample rate {sr}, the toy oracle expects {SR}")
        it["wav"] = wav.mean(1)
    return items


def codec_roundtrip(codec, wavs, batch_size=16):
    """list of (N,) numpy clips -> the codec's decode(encode(.)) of each, same length."""
    out = []
    for i in range(0, len(wavs), batch_size):
        x = torch.from_numpy(np.stack(wavs[i:i + batch_size]))[:, None]  # (B, 1, N)
        with torch.no_grad():
            y = codec.decode(codec.encode(x))[..., :x.shape[-1]]
        out += list(torch.nn.functional.pad(y, (0, x.shape[-1] - y.shape[-1]))[:, 0].numpy())
    return out


def oracle_check(data_root="data/toy", codec_path=None, max_clips=300, split="test"):
    """Oracle accuracy on up to max_clips of a toy split and, given a codec, on their round trips:
    {"clips": control(...), "roundtrip": control(...)}. Targets (acc_all): >= 99% and >= 95%."""
    manifest = _split_manifest(data_root, split)
    items = _load_items(manifest, max_clips)
    truth = [it["attributes"] for it in items]
    res = dict(n_clips=len(items), clips=control(truth, [analyse_clip(it["wav"]) for it in items]))
    if codec_path:
        wavs = codec_roundtrip(codec_lib.load_codec(codec_path), [it["wav"] for it in items])
        res.update(codec=codec_path, roundtrip=control(truth, [analyse_clip(w) for w in wavs]))
    return res


def evaluate_run(run, data_root="data/toy", samples_per_prompt=4, max_prompts=None, seed=0, batch_size=16,
                 cfg_coef=None, top_k=None, device="cpu", progress=True, split="test"):
    """Generate samples_per_prompt clips for each prompt of a toy split with the run's LM and score them.
    cfg_coef / top_k None: the sampling defaults the run recorded (sample.run_defaults)."""
    defaults = sample.run_defaults(run)
    cfg_coef = defaults["cfg_coef"] if cfg_coef is None else cfg_coef
    top_k = defaults["top_k"] if top_k is None else top_k
    items = _load_items(_split_manifest(data_root, split), max_prompts)
    codec, t5, lm = sample.load_run(run, device)
    texts = [it["text"] for it in items for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    wavs = []
    for i in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress):
        w = sample.generate_audio(codec, t5, lm, texts[i:i + batch_size], duration=len(items[0]["wav"]) / SR,
                                  cfg_coef=cfg_coef, top_k=top_k, generator=gen, progress=False)
        wavs += list(w[:, 0].float().cpu().numpy())
    generated = [wavs[i * samples_per_prompt:(i + 1) * samples_per_prompt] for i in range(len(items))]
    return score(items, generated)


METRICS = ("acc_count", "acc_pitch", "acc_kind", "acc_all", "agree", "kl", "fd")


def format_table(results):
    """results: {split: {metric: value or (mean, half-width)}} -> markdown table."""
    fmt = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}" if isinstance(v, (tuple, list)) else f"{v:.3f}"
    lines = ["| split | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for split, m in results.items():
        lines.append(f"| {split} | " + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the toy Table 1
# name -> train.py flags. PAPER.md §3.2: best = RR max pooling, lambda 3, 10% CFG steps; mean pooling gave no gain.
ABLATION = {
    "no_rr": dict(rr_weight=0.0, rr_pool="max", cfg_prob=0.1),
    "rr_max_l3": dict(rr_weight=3.0, rr_pool="max", cfg_prob=0.1),
    "rr_mean_l3": dict(rr_weight=3.0, rr_pool="mean", cfg_prob=0.1),
    "rr_max_l1": dict(rr_weight=1.0, rr_pool="max", cfg_prob=0.1),
    "rr_max_l10": dict(rr_weight=10.0, rr_pool="max", cfg_prob=0.1),
    "no_rr_cfg0.3": dict(rr_weight=0.0, rr_pool="max", cfg_prob=0.3),
    "rr_max_l3_cfg0.3": dict(rr_weight=3.0, rr_pool="max", cfg_prob=0.3),
}


def run_ablation(args):
    """Train every config x seed with the same steps (LM only: the main run's codec, T5 and token cache are
    reused), evaluate each on the test split, and aggregate over seeds: each metric's mean with its 95% CI, and
    each config's paired difference against no_rr. Resumable: finished runs are kept in
    ABLATION_DIR/results.json and skipped."""
    for path, what in ((args.ablation_codec, "toy codec"), (os.path.join(args.ablation_t5, "config.json"), "toy T5")):
        if not os.path.exists(path):
            raise SystemExit(f"evaluate.py: error: {what} not found at {path}; run the main job python train.py first")
    unknown = sorted(set(args.configs) - set(ABLATION))
    if unknown:
        raise SystemExit(f"evaluate.py: error: unknown --configs {unknown}; expected some of {list(ABLATION)}")
    res_path = os.path.join(args.ablation_dir, "results.json")
    runs = json.load(open(res_path)) if os.path.exists(res_path) else {}
    for name in args.configs:
        for seed in args.seeds:
            key, run_dir = f"{name}/seed{seed}", os.path.join(args.ablation_dir, name, f"seed{seed}")
            if key in runs and runs[key]["steps"] == args.ablation_steps:
                continue
            flags = {**ABLATION[name], "seed": seed, "steps": args.ablation_steps,
                     "warmup": max(1, args.ablation_steps // 10), "run_dir": run_dir, "codec": args.ablation_codec,
                     "t5": args.ablation_t5, "samples": 0,
                     "cache_dir": os.path.join(args.ablation_dir, "tokens"), "eval_every": args.ablation_steps,
                     "save_every": args.ablation_steps}
            cmd = [sys.executable, "train.py", "--preset", "toy"] + [a for k, v in flags.items()
                                                                      for a in ("--" + k.replace("_", "-"), str(v))]
            cmd += args.train_args.split()
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run restarts from scratch (same result)
            print("+", " ".join(cmd), flush=True)
            t0 = time.time()
            if subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).returncode != 0:
                raise SystemExit(f"evaluate.py: error: training {key} failed (command above)")
            t1 = time.time()
            metrics = evaluate_run(run_dir, args.data, args.samples_per_prompt, args.max_prompts, args.seed,
                                   args.batch_size, (args.cfg_coef or [None])[0], (args.top_k or [None])[0],
                                   args.device, progress=False)
            runs[key] = dict(config=name, seed=seed, steps=args.ablation_steps, flags=flags, metrics=metrics,
                             train_s=round(t1 - t0, 1), eval_s=round(time.time() - t1, 1))
            data.atomic_write(res_path, json.dumps(runs, indent=1))
            r = runs[key]
            print(f"{key}: acc_all {metrics['all']['acc_all']:.3f}; train {r['train_s']} s, eval {r['eval_s']} s")
    table, paired = {}, {}
    for name in args.configs:
        done = [runs[f"{name}/seed{s}"]["metrics"] for s in args.seeds if f"{name}/seed{s}" in runs]
        for split in ("all", "held_out"):
            table[f"{name} [{split}]"] = {k: mean_ci([m[split][k] for m in done]) for k in METRICS}
    base = "no_rr" if "no_rr" in args.configs else None
    for name in args.configs:  # the same seed = the same init, data order and CFG steps: compare per seed
        seeds = [s for s in args.seeds if f"{name}/seed{s}" in runs and f"{base}/seed{s}" in runs]
        if base is None or name == base or not seeds:
            continue
        for split, k in PAIRED_METRICS:
            d = paired_difference([runs[f"{name}/seed{s}"]["metrics"][split][k] for s in seeds],
                                  [runs[f"{base}/seed{s}"]["metrics"][split][k] for s in seeds])
            paired[f"{name} - {base}: {k} [{split}]"] = d
    wall = sum(r["train_s"] + r["eval_s"] for r in runs.values())
    print(f"mean ± 95% CI half-width over seeds {args.seeds}, {args.ablation_steps} steps each; the runs took "
          f"{wall / 60:.1f} min of training and evaluation")
    print(format_table(table).replace("| split |", "| config [split] |"))
    if paired:
        print("\npaired difference against no_rr, same seeds: mean ± 95% CI half-width (seeds where it is higher)")
        for key, d in paired.items():
            print(f"  {key}: {d['mean']:+.3f} ± {d['half_width']:.3f} ({d['wins']} of {d['n']})")
    return dict(table={k: {m: list(v) for m, v in row.items()} for k, row in table.items()}, paired=paired, runs=runs)


# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables); beyond 30, the normal's 1.96
# is within 2% of the truth.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}
PAIRED_METRICS = (("all", "acc_count"), ("all", "acc_all"), ("held_out", "acc_all"), ("all", "fd"))


def mean_ci(values):
    """(mean, half-width of its 95% t confidence interval) of independent values; half-width nan for one value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()) if len(x) else float("nan"), float("nan")
    return float(x.mean()), float(T_975.get(len(x) - 1, 1.96) * x.std(ddof=1) / math.sqrt(len(x)))


def paired_difference(a, b):
    """a[i] - b[i] over paired runs (the same seed): mean, 95% CI half-width, n, and wins = the pairs with a > b."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean, half = mean_ci(d)
    return dict(mean=mean, half_width=half, n=len(d), wins=int((d > 0).sum()))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Toy controllability evaluation: oracle, control accuracy, FD/KL/agree.")
    ap.add_argument("--ckpt", help="train.py run directory or its lm.pt: generate for a split's prompts and score")
    ap.add_argument("--oracle-check", action="store_true", help="oracle accuracy on toy clips and codec round trips")
    ap.add_argument("--ablation", action="store_true", help="train + evaluate the toy Table 1 grid (RESULTS.md)")
    ap.add_argument("--data", default="data/toy", help="toy data root (made with data.ensure_toy_dataset if missing)")
    ap.add_argument("--codec", default="runs/toy/codec/codec.pt", help="codec for --oracle-check round trips")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="generated clips per test prompt")
    ap.add_argument("--max-prompts", type=int, default=None, help="use only the first N test prompts")
    ap.add_argument("--max-clips", type=int, default=300, help="clips for --oracle-check")
    ap.add_argument("--split", default="test", choices=("train", "valid", "test"),
                    help="the split whose prompts --ckpt generates for (choose sampling settings on valid, report "
                         "on test) or whose clips --oracle-check reads")
    ap.add_argument("--cfg-coef", type=float, nargs="+", default=None,
                    help="CFG coefficient at sampling; several values (with several --top-k) evaluate every "
                         "combination (default: the run's recorded sample_cfg_coef)")
    ap.add_argument("--top-k", type=int, nargs="+", default=None,
                    help="top-k sampling, one or several values (default: the run's recorded sample_top_k)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--batch-size", type=int, default=32, help="clips generated together")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--configs", nargs="+", default=list(ABLATION), help=f"ablation configs (of {list(ABLATION)})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ablation training seeds")
    ap.add_argument("--ablation-steps", type=int, default=300, help="training steps of every ablation run")
    ap.add_argument("--ablation-dir", default="runs/ablation", help="ablation runs + results.json (resumable)")
    ap.add_argument("--ablation-codec", default="runs/toy/codec/codec.pt", help="codec shared by the ablation runs")
    ap.add_argument("--ablation-t5", default="runs/toy/t5", help="toy T5 shared by the ablation runs")
    ap.add_argument("--train-args", default="", help="extra train.py flags for every ablation run, e.g. '--lr 1e-3'")
    args = ap.parse_args(argv)
    if sum(map(bool, (args.ckpt, args.oracle_check, args.ablation))) != 1:
        raise SystemExit("evaluate.py: error: give exactly one of --ckpt RUN, --oracle-check, --ablation")
    if args.samples_per_prompt < 1 or args.batch_size < 1:
        raise SystemExit("evaluate.py: error: --samples-per-prompt and --batch-size must be >= 1")
    if any(not math.isfinite(c) for c in args.cfg_coef or []) or any(k < 0 for k in args.top_k or []):
        raise SystemExit(f"evaluate.py: error: need finite --cfg-coef and --top-k >= 0, got {args.cfg_coef}, "
                         f"{args.top_k}")
    if args.ablation and (len(args.cfg_coef or [0]) > 1 or len(args.top_k or [0]) > 1):
        raise SystemExit("evaluate.py: error: --ablation takes one --cfg-coef and one --top-k")
    torch.set_num_threads(args.threads)  # oversubscribed OpenMP threads made generation 7x slower on 2 busy cores
    if args.oracle_check:
        codec = args.codec if os.path.exists(args.codec) else None
        if codec is None:
            print(f"(no codec at {args.codec}: round trips skipped; train one or pass --codec)")
        res = oracle_check(args.data, codec, args.max_clips, args.split)
        for key, what in (("clips", f"{res['n_clips']} {args.split} clips"), ("roundtrip", f"round trips, {codec}")):
            if key in res:
                print(f"oracle on {what}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in res[key].items()))
    elif args.ckpt:
        if not os.path.exists(args.ckpt):
            raise SystemExit(f"evaluate.py: error: run not found: {args.ckpt} (train one with `python train.py`)")
        grid = [(c, k) for c in args.cfg_coef or [None] for k in args.top_k or [None]]
        try:
            defaults = sample.run_defaults(args.ckpt)
            res, rows = {}, {}
            for c, k in grid:
                c, k = defaults["cfg_coef"] if c is None else c, defaults["top_k"] if k is None else k
                name = f"cfg {c:g}, top-k {k}"
                res[name] = evaluate_run(args.ckpt, args.data, args.samples_per_prompt, args.max_prompts, args.seed,
                                         args.batch_size, c, k, args.device, progress=len(grid) == 1,
                                         split=args.split)
                rows.update({f"{name} [{split}]": m for split, m in res[name].items()
                             if split != "seen" or "held_out" in res[name]})  # valid: seen = all
                print(f"{args.split} split, {name}: acc_all {res[name]['all']['acc_all']:.3f}", flush=True)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"evaluate.py: error: {e}")
        res = res[name] if len(grid) == 1 else res
        print(format_table(rows).replace("| split |", "| sampling [split] |"))
    else:
        res = run_ablation(args)
    if args.json:
        data.atomic_write(args.json, json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
