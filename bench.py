"""Speed and memory of our LM training step, CFG sampler and codec against the `transformers` ports and against
this machine's limits.

    python bench.py                                   # CPU: toy + small (2 of its 24 layers), ~6 min
    python bench.py --presets small --json bench.json # CUDA: full small, bf16 training step with MFU
    python bench.py --decode-scaling                  # our decoding of small over audio length and batch
    python bench.py --decode-profile                  # where a decoding step of the 24-layer small spends its time

Every run also measures this machine's limits (matmul peak, memory bandwidth) and reports each line as a fraction
of its limit: training and codec FLOP/s of the peak, a decoding step against streaming its weights once.

Both sides get the same weights: ours are built with a fixed seed and converted to transformers' names
(`MusicgenForCausalLM` for the LM, `EncodecModel` for the codec); a probe input checks that both compute the
same function before anything is timed. Every measurement runs in a fresh child process (imports, weights,
warm-up, timed repeats; on CPU peak memory in one more child) with the same fixed glibc heap settings, so that
the two sides never share allocator state or caches and neither inherits a luckier one (see run_child).
Timings are medians of the repeats after warm-up, with torch's thread count fixed; on CPU each side runs in
3 such children, alternating ours / theirs, and the median child counts (shared VMs drift). transformers is a
test/bench-only dependency.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import gc
import types

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import codec as codec_lib
import lm as lm_lib
import text_encoder
import train
from rr_loss import pool_time, rr_from_pooled

MIN_TIMED_SECONDS = 1.0  # cases shorter than this repeat until they add up to it, so the median resists hiccups
RR_WEIGHT = 3.0  # λ of Eq. 6, the paper's best setting (PAPER.md §3.2)
# dense bf16 tensor-core peaks (no sparsity) by device-name substring, first match wins (V100: fp16)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0,
               "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "4090": 165.0, "3090": 71.0, "V100": 125.0}


# ---------------------------------------------------------------- configs

def bench_lm_config(preset, layers=None):
    """Our LMConfig for a bench preset: toy takes its card and text width from the toy codec and toy T5 (as
    train.py does); `layers` scales the layer count down (CPU)."""
    over = dict(num_layers=layers)
    if preset == "toy":
        over.update(card=codec_lib.CODEC_PRESETS["toy"].bins, text_dim=text_encoder.TOY_T5["d_model"])
    return lm_lib.lm_config(preset, **over)


# ---------------------------------------------------------------- transformers side: same weights, their names

def to_transformers_lm(ours):
    """AudioLM -> (MusicgenForCausalLM, text projection Linear) holding the same weights. audiocraft/our names ->
    transformers' (the inverse of test_all.py's renaming); the T5->LM projection is MusicGen's enc_to_dec_proj,
    which lives outside the decoder in transformers, so it is a separate Linear here."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM  # only in the children of its side
    cfg = ours.cfg
    hcfg = MusicgenDecoderConfig(vocab_size=cfg.card, hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
                                 num_attention_heads=cfg.num_heads, ffn_dim=cfg.hidden_scale * cfg.dim,
                                 num_codebooks=cfg.num_codebooks,
                                 max_position_embeddings=cfg.max_frames + cfg.num_codebooks,
                                 dropout=0.0, pad_token_id=cfg.card, bos_token_id=cfg.card)
    hcfg.decoder_start_token_id = cfg.card
    hf = MusicgenForCausalLM(hcfg)
    ren = [("emb.", "model.decoder.embed_tokens."), ("out_norm.", "model.decoder.layer_norm."),
           ("transformer.layers.", "model.decoder.layers."), (".norm_cross.", ".encoder_attn_layer_norm."),
           (".norm1.", ".self_attn_layer_norm."), (".norm2.", ".final_layer_norm."),
           (".cross_attention.", ".encoder_attn."), (".linear1.", ".fc1."), (".linear2.", ".fc2."),
           ("linears.", "lm_heads.")]
    sd = {}
    for name, p in ours.state_dict().items():
        if name.startswith("text_proj."):
            continue
        for a, b in ren:
            name = name.replace(a, b)
        if name.endswith(".in_proj_weight"):  # fused q/k/v -> three Linears
            for x, w in zip("qkv", p.chunk(3)):
                sd[name.replace("in_proj_weight", f"{x}_proj.weight")] = w.clone()
        else:
            sd[name] = p.clone()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "embed_positions" not in k]
    if missing or unexpected:
        raise RuntimeError(f"LM conversion to transformers failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    proj = torch.nn.Linear(cfg.text_dim, cfg.dim)
    proj.load_state_dict(ours.text_proj.state_dict())
    hf.generation_config.pad_token_id = hf.generation_config.bos_token_id = cfg.card
    hf.generation_config.decoder_start_token_id = cfg.card
    return hf, proj


# ---------------------------------------------------------------- measurement helpers (run in the child)

def _rss_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak memory above the level at start(): CUDA max_memory_allocated, else the process' peak RSS (VmHWM),
    whose high-water mark is reset with /proc/self/clear_refs (tracemalloc does not see torch's allocations)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak-RSS mark to the current RSS (Linux >= 4.0)
                self.base = _rss_kib("VmRSS") * 1024
            except OSError:  # cannot reset: count only growth above the earlier peak (a lower bound)
                self.base = _rss_kib("VmHWM") * 1024

    def peak_mib(self):
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        return max(0, _rss_kib("VmHWM") * 1024 - self.base) / 2 ** 20


def timed(fn, device, case):
    """Median wall seconds of fn() over case["repeats"] runs (more for short work, up to MIN_TIMED_SECONDS) after
    case["warmup"] runs, and the peak memory of all of them.
    case["memory_only"] (the CPU memory child): the peak RSS of one run after the warm-up runs, above the level
    they leave (weights, optimizer state): what each further step of a long run adds."""
    mem = PeakMemory(device)
    if case.get("memory_only"):
        for _ in range(case["warmup"]):
            fn()
        mem.start()
        fn()
        return dict(peak_mib=mem.peak_mib())
    mem.start()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(case["warmup"]):
        fn()
    sync()
    times = []
    while len(times) < case["repeats"] or (sum(times) < MIN_TIMED_SECONDS and len(times) < 50):  # short work: more runs
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(seconds=statistics.median(times), times=times, peak_mib=mem.peak_mib())


def _lm_inputs(cfg, B, T, Tt, device, seed=1):
    """Random codes (B, K, T), T5-like text (B, Tt, Dt) and a mask with the last caption padded (a real batch)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (B, cfg.num_codebooks, T), generator=g)
    text = torch.randn(B, Tt, cfg.text_dim, generator=g)
    mask = torch.ones(B, Tt, dtype=torch.bool)
    if B > 1:
        mask[-1, Tt // 2:] = False
    text = text * mask[..., None]
    return codes.to(device), text.to(device), mask.to(device)


def _probe(forward, cfg, device):
    """A few logits of a fixed input: the parent compares them across sides (same weights, same function)."""
    codes, text, mask = _lm_inputs(cfg, 2, 6, 5, device, seed=7)
    mask[:] = True  # no padding: transformers' masked cross-attention and audiocraft's zero-padding
    # agree (PAPER.md "audiocraft: cross-attention and padding")
    seq = lm_lib.build_delay_pattern(codes, cfg.card)
    with torch.no_grad():
        logits = forward(seq, text, mask).float()  # (B, K, S, card)
    return dict(values=logits[:, :, :, :8].flatten().tolist())


# ---------------------------------------------------------------- the cases (one per child process)

def case_train(case, device):
    """One training step: forward + backward + grad clip + AdamW (PAPER.md §4.2 settings, as train.py builds it)
    on B x T frames. Ours: train.py's own loss path (lm_forward: per-codebook CE sums over valid tokens; pool_time +
    rr_from_pooled: Eq. 3-5) with cross-attention AND the RR term -- a real step has one or the other (Eq. 6),
    so this is an upper bound of our cost. Theirs: MusicgenForCausalLM's own CE on the same delayed sequence,
    the text projected by the same Linear (MusicGen's enc_to_dec_proj) and masked as MusicGen does."""
    torch.manual_seed(0)
    cfg = bench_lm_config(case["preset"], case.get("layers"))
    ours = lm_lib.AudioLM(cfg)
    B, T, Tt, K = case["batch"], case["frames"], case["text_len"], cfg.num_codebooks
    codes, text, mask = _lm_inputs(cfg, B, T, Tt, device)
    fmask = torch.ones(B, T, dtype=torch.bool, device=device)
    n_valid = (lm_lib.delay_valid_mask(K, T, device)[None] & fmask[:, None]).sum((0, 2)).float()  # (K,) tokens
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["bf16"])
    if case["side"] == "ours":
        del ours  # the LM exactly as `python train.py` builds it in one process (train.build_lm, seed 0)
        model = _train_py_lm(cfg, case["preset"], case.get("layers"), T, device, case.get("checkpointing", False))
        params = list(model.parameters())
        probe = _probe(lambda s, t, m: model(s, t, m)[0], cfg, device)

        def loss_fn():  # train.train_step's loss on one rank, one micro-batch: Eq. 1 + lambda * Eq. 5
            with autocast():
                out = train.lm_forward(model, codes, text, mask, False, fmask, "bf16" if case["bf16"] else "fp32")
                a = pool_time(out["hidden"], out["hidden_mask"], "max").float()
                rr = rr_from_pooled(pool_time(text, mask, "max"), a)
            return (out["ce_sum"] / n_valid).mean() + RR_WEIGHT * rr
    else:
        hf, proj = to_transformers_lm(ours)
        del ours
        hf, proj = hf.to(device).train(), proj.to(device).train()
        if case.get("checkpointing"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=False))
        params = list(hf.parameters()) + list(proj.parameters())

        def hf_forward(seq, txt, msk, labels=None):  # MusicgenForConditionalGeneration's decoder call
            enc = proj(txt) * msk[..., None]
            out = hf(input_ids=seq.reshape(-1, seq.shape[-1]), encoder_hidden_states=enc,
                     encoder_attention_mask=msk.long(), labels=labels)
            return out if labels is not None else out.logits.view(*seq.shape, -1)
        probe = _probe(hf_forward, cfg, device)
        seq = lm_lib.build_delay_pattern(codes, cfg.card)  # (B, K, T+1): the same positions as ours
        labels = torch.cat([seq[:, :, 1:], torch.full_like(seq[:, :, :1], cfg.card)], 2).transpose(1, 2)  # (B, S, K)
        labels = labels.contiguous()

        def loss_fn():
            with autocast():
                return hf_forward(seq, text, mask, labels=labels).loss
    # fused AdamW on both sides: train.py builds it so, and it is transformers' Trainer default (torch >= 2.8)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    phases = []  # CPU only: wall seconds of forward+loss, backward, clip+AdamW of every step (no extra syncs)

    def step():
        t0 = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    r = timed(step, device, case)
    if device.type == "cpu" and "times" in r:
        r["phases"] = [statistics.median(p) for p in zip(*phases[-len(r["times"]):])]
    r.update(probe=probe, tokens=B * K * T, positions=B * (T + 1), flops=train_flops(cfg, B, T + 1, Tt))
    return r


def _train_py_lm(cfg, preset, layers, frames, device, checkpointing=False):
    """train.build_lm in a world of one process (train.init_distributed without torchrun): seed 0, as ours."""
    train_cfg = train.TrainConfig(device=device.type, lm_preset=preset, lm_layers=layers or 0, meta_init=False,
                                  seed=0, segment_seconds=frames / 50, activation_checkpointing=checkpointing,
                                  precision="fp32")
    _, _, dev = train.init_distributed(train_cfg)
    codec = types.SimpleNamespace(num_codebooks=cfg.num_codebooks, cardinality=cfg.card)
    t5 = types.SimpleNamespace(dim=cfg.text_dim)
    return train.build_lm(train_cfg, codec, t5, frames, 0, dev).train()


def train_flops(cfg, B, S, Tt):
    """Model FLOPs of one training step (forward + backward = 3x forward; a multiply-add is 2 FLOPs):
      6 * B*S  * N_audio,  N_audio = L*(4D^2 self-attn + 2D^2 cross q/out + 2*hs*D^2 FFN) + K*card*D heads
    + 6 * B*Tt * N_text,   N_text  = L*2D^2 cross k/v + Dt*D text projection
    + 6 * B*L * (S^2*D causal self-attention QK^T + AV, half of the square) + 6 * B*L * (2*S*Tt*D cross-attention).
    Embedding lookups, norms, softmax, the loss and the optimizer are not counted."""
    D, L, K = cfg.dim, cfg.num_layers, cfg.num_codebooks
    n_audio = L * (4 + 2 + 2 * cfg.hidden_scale) * D * D + K * cfg.card * D
    n_text = L * 2 * D * D + cfg.text_dim * D
    attn = L * (S * S * D + 2 * S * Tt * D)
    return 6 * B * S * n_audio + 6 * B * Tt * n_text + 6 * B * attn


def case_gen(case, device):
    """Sampling with CFG 3.0, top-k 250, temperature 1 (PAPER.md §4.2; PAPER.md "audiocraft: sampling"): B prompts,
    T frames = T+K-1 LM steps.
    Ours: lm.generate with its defaults (KV cache, cached cross-attention keys/values). Theirs:
    MusicgenForCausalLM.generate(guidance_scale=3) with the null condition as MusicGen builds it (zero text,
    zero mask) and max_length T+K, which yields the same T frames per codebook."""
    torch.manual_seed(0)
    cfg = bench_lm_config(case["preset"], case.get("layers"))
    ours = lm_lib.AudioLM(cfg).eval()
    B, T, Tt, K = case["batch"], case["frames"], case["text_len"], cfg.num_codebooks
    _, text, mask = _lm_inputs(cfg, B, 1, Tt, device)
    if case["side"] == "ours":
        model = ours.to(device)
        gen = torch.Generator(device=device).manual_seed(0)

        def run(greedy_frames=None):
            kw = dict(temperature=0.0) if greedy_frames else dict(top_k=250, generator=gen)
            out = lm_lib.generate(model, text, mask, greedy_frames or T, cfg_coef=3.0, progress=False, **kw)
            assert greedy_frames or out.shape == (B, K, T), out.shape
            return out
    else:
        hf, proj = to_transformers_lm(ours)
        del ours
        hf, proj = hf.to(device).eval(), proj.to(device).eval()
        torch.manual_seed(0)

        def run(greedy_frames=None):
            out = hf_generate(hf, proj, text, mask, greedy_frames or T, greedy=greedy_frames is not None)
            assert greedy_frames or out.shape == (B, K, T), out.shape
            return out
    # greedy probe: a few frames of argmax decoding must agree between the sides (same weights, same sampler)
    probe = dict(tokens=run(greedy_frames=3)[0, :, :3].flatten().tolist())  # prompt 0 is unpadded: same function
    r = timed(run, device, case)
    r.update(tokens=B * K * T, audio_seconds=B * T / case["frame_rate"], probe=probe, steps=T + K - 1,
             weight_bytes=decode_weight_bytes(cfg))  # fp32 weights on both sides
    return r


@torch.no_grad()
def hf_generate(hf, proj, text, mask, T, greedy=False):
    """transformers' MusicGen sampling as MusicgenForConditionalGeneration sets it up: null condition = zero text
    with a zero mask, concatenated after the prompts; guidance_scale 3, top-k 250. Two things its decoder-only
    generate gets wrong on its own, set here explicitly: the BOS (= pad id) would be masked out of self-attention
    (attention_mask of ones), and a plain DynamicCache mixes cross-attention keys into the self-attention cache
    (an EncoderDecoderCache, which also caches the text keys/values once)."""
    from transformers import DynamicCache, EncoderDecoderCache  # only in the children of its side
    B, K, card = text.shape[0], hf.num_codebooks, hf.config.vocab_size
    enc = proj(text) * mask[..., None]
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=250)
    return hf.generate(input_ids=torch.full((B * K, 1), card, device=text.device),
                       attention_mask=torch.ones(B * K, 1, dtype=torch.long, device=text.device),
                       encoder_hidden_states=torch.cat([enc, torch.zeros_like(enc)]),
                       encoder_attention_mask=torch.cat([mask, torch.zeros_like(mask)]).long(),
                       cache=EncoderDecoderCache(DynamicCache(config=hf.config), DynamicCache(config=hf.config)),
                       guidance_scale=3.0, max_length=T + K, num_return_sequences=1, **sampling)


CODEC_LAYOUTS = ("toy", "musicgen-32khz")  # codec.CODEC_PRESETS names


def to_transformers_codec(ours):
    """codec.EncodecModel (audiocraft names) -> transformers.EncodecModel with the same weights. The renaming of
    transformers' convert_encodec_checkpoint_to_pytorch, inverted; weight_g / weight_v are its weight-norm
    parametrization's original0 / original1."""
    from transformers import EncodecConfig, EncodecModel  # only in the children of its side
    cfg = ours.cfg
    nbits = math.ceil(math.log2(cfg.bins))
    frame_rate = math.ceil(cfg.sample_rate / math.prod(cfg.ratios))
    hcfg = EncodecConfig(sampling_rate=cfg.sample_rate, audio_channels=1, num_filters=cfg.n_filters,
                         upsampling_ratios=list(cfg.ratios), kernel_size=cfg.kernel_size,
                         last_kernel_size=cfg.last_kernel_size,
                         residual_kernel_size=cfg.residual_kernel_size, dilation_growth_rate=cfg.dilation_base,
                         num_residual_layers=cfg.n_residual_layers, num_lstm_layers=cfg.lstm, compress=cfg.compress,
                         hidden_size=cfg.dimension, codebook_size=cfg.bins, codebook_dim=cfg.dimension,
                         use_causal_conv=False, pad_mode="constant", norm_type="weight_norm", use_conv_shortcut=False,
                         normalize=False, chunk_length_s=None, overlap=None,
                         target_bandwidths=[cfg.n_q * nbits * frame_rate / 1000])  # -> exactly n_q quantizers
    hf = EncodecModel(hcfg)
    ren = [(r"^(encoder|decoder)\.model\.", r"\1.layers."), (r"\.(conv\.conv|convtr\.convtr)\.weight_g$",
           ".conv.parametrizations.weight.original0"), (r"\.(conv\.conv|convtr\.convtr)\.weight_v$",
           ".conv.parametrizations.weight.original1"), (r"\.(conv\.conv|convtr\.convtr)\.bias$", ".conv.bias"),
           (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook.")]
    sd = {}
    for name, p in ours.state_dict().items():
        for a, b in ren:
            name = re.sub(a, b, name)
        sd[name] = p.clone()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"codec conversion to transformers failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval(), hcfg.target_bandwidths[0]


def case_codec(case, device):
    """Codec encode (wav -> codes) or decode (codes -> wav) of B clips of `seconds` s, under no_grad as sample.py
    and train.py call it. Weights: a seeded random init with random codebooks (an untrained codebook is all zeros)."""
    cfg = codec_lib.CODEC_PRESETS[case["layout"]]
    torch.manual_seed(0)
    ours = codec_lib.EncodecModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    B, N = case["batch"], int(round(case["seconds"] * cfg.sample_rate))
    T = -(-N // ours.hop_length)
    wav = 0.1 * torch.randn(B, 1, N, generator=g)
    with torch.no_grad():  # random codebooks at the latents' scale, so that the codes vary
        scale = ours.encoder(wav[:1, :, :cfg.sample_rate // 4]).std()
        for k, layer in enumerate(ours.quantizer.vq["layers"]):
            layer._codebook.embed.normal_(0.0, float(scale) / (k + 1))
            layer._codebook.inited.fill_(1)
    wav = wav.to(device)
    codes = torch.randint(0, cfg.bins, (B, cfg.n_q, T), generator=g).to(device)
    if case["side"] == "ours":
        model = ours.to(device)
        encode, decode = model.encode, model.decode
    else:
        hf, bw = to_transformers_codec(ours)
        del ours
        hf = hf.to(device)
        encode = lambda w: hf.encode(w, bandwidth=bw, return_dict=True).audio_codes[0]  # (B, K, T)
        decode = lambda q: hf.decode(q[None], [None], return_dict=True).audio_values  # (B, 1, N')
    with torch.no_grad():
        probe_codes = encode(wav[:, :, :cfg.sample_rate // 4])
        probe = dict(tokens=probe_codes[0, :, :8].flatten().tolist(),
                     values=decode(codes[:, :, :8])[0, 0, :64].flatten().tolist())
        fn = (lambda: encode(wav)) if case["op"] == "encode" else (lambda: decode(codes))
        r = timed(fn, device, case)
        with FlopCounterMode(display=False) as flops:  # the convolutions (and RVQ distances); the LSTM is not counted
            fn()
    r.update(audio_seconds=B * N / cfg.sample_rate, probe=probe, flops=flops.get_total_flops())
    return r


def case_limits(case, device):
    """This machine's limits, measured in the same run as what they bound (best of a few repeats):
    matmul peak FLOP/s: an n x n GEMM, fp32 (sgemm) on CPU, bf16 on CUDA, the precisions training runs in;
    memory bandwidth: a 1 GiB tensor copy, read + write bytes (and, as information, a read-only sum)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = lambda fn, reps: best_seconds(fn, reps, sync)
    n = 8192 if cuda else 2048
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    gemm = 2 * n ** 3 / best(lambda: torch.mm(a, b, out=c), 10 if cuda else 5)
    del a, b, c
    src = torch.ones(2 ** 28, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    copy = 2 * src.nbytes / best(lambda: dst.copy_(src), 5)
    read = src.nbytes / best(lambda: src.sum(), 5)
    return dict(peak_flops=gemm, bandwidth=copy, read_bandwidth=read, gemm_n=n, gemm_dtype=str(dtype))


def decode_weight_bytes(cfg, itemsize=4):
    """Bytes of weights one CFG decoding step must read, whatever the batch: per layer the self-attention q,k,v,o
    (4D^2), the cross-attention q and o (2D^2; its keys / values of the text are computed once), the FFN
    (2*h*D^2), and the K output heads (K*card*D). Embedding rows and norms are negligible."""
    D = cfg.dim
    return itemsize * (cfg.num_layers * (4 + 2 + 2 * cfg.hidden_scale) * D * D + cfg.num_codebooks * cfg.card * D)


def case_profile(case, device):
    """Where our CFG decoding step of `small` spends its time, and what its matrix products alone cost.
    1. lm.generate as sample.py runs it (batch 1, CFG 3, top-k 250): timed, then once under torch.profiler for the
       self time of each op per step (the profiler's overhead inflates the total; its shares are what count).
    2. The step's weight products alone, as the stepper computes them (lm.few_rows_linear: 2 rows for the doubled
       CFG batch; 1 for the cross-attention and the heads, which only the conditional row needs), back to back: the
       time no change outside the products can go below. And a plain read (sum) of the same weights: a ceiling
       for any kernel that reads each weight once."""
    torch.manual_seed(0)
    cfg = bench_lm_config("small", case["layers"])
    model = lm_lib.AudioLM(cfg).eval().to(device)
    _, text, mask = _lm_inputs(cfg, 1, 1, 16, device)
    T, steps = case["frames"], case["frames"] + cfg.num_codebooks - 1

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        lm_lib.generate(model, text, mask, T, cfg_coef=3.0, top_k=250, generator=gen, progress=False)
    step_s = best_seconds(run, 3) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_us = sum(e.self_cpu_time_total for e in ops)
    top = [dict(op=e.key, share=e.self_cpu_time_total / total_us, calls=e.count / steps) for e in ops[:8]]
    D = cfg.dim
    work = []  # (weight, rows) of one step
    for L in model.transformer.layers:
        work += [(L.self_attn.in_proj_weight, 2), (L.self_attn.out_proj.weight, 2),
                 (L.cross_attention.in_proj_weight[:D], 1), (L.cross_attention.out_proj.weight, 1),
                 (L.linear1.weight, 2), (L.linear2.weight, 2)]
    work += [(lin.weight, 1) for lin in model.linears]
    xs = {(n, w.shape[1]): torch.randn(n, w.shape[1], device=device) for w, n in work}  # contiguous, as in a step
    with torch.inference_mode():
        def products():
            for w, n in work:
                lm_lib.few_rows_linear(xs[n, w.shape[1]], w)

        def read():
            for w, _ in work:
                w.sum()
        products(), read()
        pairs = [(wall_seconds(products), wall_seconds(read)) for _ in range(7)]  # alternating: same conditions
        products_s, read_s = min(p for p, _ in pairs), min(r for _, r in pairs)
    nbytes = sum(w.numel() * w.element_size() for w, _ in work)
    return dict(step_seconds=step_s, steps=steps, top=top, products_seconds=products_s, read_seconds=read_s,
                weight_bytes=nbytes, num_products=len(work))


def wall_seconds(fn, sync=lambda: None):
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def best_seconds(fn, reps, sync=lambda: None):
    """Fastest of `reps` timed runs of fn() after one untimed run: for limits, where the best run is the bound."""
    fn()
    sync()
    return min(wall_seconds(fn, sync) for _ in range(reps))


CASES = {"train": case_train, "gen": case_gen, "codec": case_codec, "limits": case_limits, "profile": case_profile}


def child_main(spec):
    case = json.loads(spec)
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])  # no TF32 switch: neither train.py nor sample.py sets one
    r = CASES[case["part"]](case, device)
    print("BENCH_RESULT " + json.dumps(r), flush=True)


# ---------------------------------------------------------------- parent: run the cases, print the table

def run_child(case, timeout):
    env = dict(os.environ, OMP_NUM_THREADS=str(case["threads"]), MKL_NUM_THREADS=str(case["threads"]),
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    # glibc's heap, fixed and equal for both sides (fixed thresholds also switch off glibc's dynamic adjustment):
    if case.get("memory_only"):  # big tensors mmapped and unmapped at once, so the peak RSS is honest
        env.update(MALLOC_MMAP_THRESHOLD_=str(128 << 10), MALLOC_TRIM_THRESHOLD_=str(128 << 10))
    else:  # timing: freed buffers stay in the heap, the steady state of a long-running process. Left to glibc's
        # dynamic threshold, the history of frees before timing (e.g. the weight conversion only the transformers
        # side does) decided whether every big activation is page-faulted in anew: up to 7x on one conv layer.
        env.update(MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(4 << 30))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(case)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"bench.py: case {case['part']}/{case.get('preset', '-')}/{case['side']} failed (exit {p.returncode}):\n  "
                         + "\n  ".join(tail))
    r = json.loads(lines[-1][len("BENCH_RESULT "):])
    r["wall"] = time.perf_counter() - t0
    return r


def small_label(layers):
    return "small" if layers == 24 else f"small ({layers} of 24 layers)"


def fmt_mem(mib):
    return f"{mib:,.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description="Ours vs transformers: LM training step, CFG generation, codec.")
    ap.add_argument("--presets", nargs="+", default=None, choices=["toy", "small"],
                    help="LM presets to run (default: toy small on CPU, small on CUDA)")
    ap.add_argument("--parts", nargs="+", default=["train", "gen", "codec"], choices=["train", "gen", "codec"],
                    help="what to measure")
    ap.add_argument("--small-layers", type=int, default=None,
                    help="layers of the `small` preset (default: 2 on CPU to keep the run short, 24 on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3 on CPU, 5 on CUDA)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timing children per side, ours and theirs alternating (default 3 on CPU, 1 on CUDA); "
                         "each side's time is the median over its rounds, so a slow spell of a shared VM hits both")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs before timing (default 1 on CPU, 2 on CUDA)")
    ap.add_argument("--train-batch", type=int, default=None,
                    help="training batch (default on CPU: 16 toy, train.py's toy batch / 2 small; 4x on CUDA)")
    ap.add_argument("--train-frames", type=int, default=None, help="frames per training clip (default 100 = 2 s on CPU, 500 = 10 s on CUDA)")
    ap.add_argument("--gen-batch", type=int, default=1, help="prompts generated together")
    ap.add_argument("--gen-frames", type=int, default=None, help="frames generated (default on CPU 100 toy / 50 small; 500 on CUDA)")
    ap.add_argument("--codec-seconds", type=float, default=None, help="audio seconds per codec call (default 2 on CPU, 10 on CUDA)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast in the training step (default: on for CUDA, off for CPU)")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="training step with each transformer block recomputed in the backward pass, both sides "
                         "(train.py --activation-checkpointing; transformers' activation_checkpointing_enable)")
    ap.add_argument("--decode-scaling", action="store_true",
                    help="instead of the table: our decoding of `small` at batch 1 for 1, 10 and 30 s of audio and at "
                         "batch 1, 2, 4, 8 for 10 s, against the weight-streaming bound, with the KV cache's size "
                         "(2 of its 24 layers on CPU unless --small-layers)")
    ap.add_argument("--decode-profile", action="store_true",
                    help="instead of the table: where our CFG decoding step of `small` (24 layers unless "
                         "--small-layers) spends its time, its weight products alone, and this machine's limits")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s of the GPU for MFU (default from its name, e.g. H100 989)")
    ap.add_argument("--json", help="also write all results to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)

    def fail(msg):
        raise SystemExit(f"bench.py: error: {msg}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        fail(f"--device {args.device} but CUDA is not available")
    for name in ("small_layers", "threads", "repeats", "rounds", "train_batch", "train_frames", "gen_batch",
                 "gen_frames"):
        v = getattr(args, name)
        if v is not None and v < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup is not None and args.warmup < 0:
        fail(f"--warmup must be >= 0, got {args.warmup}")
    if args.codec_seconds is not None and not args.codec_seconds > 0:
        fail(f"--codec-seconds must be > 0, got {args.codec_seconds}")
    if args.gen_frames is not None and args.gen_frames > lm_lib.LMConfig.max_frames:
        fail(f"--gen-frames {args.gen_frames} exceeds the LM's {lm_lib.LMConfig.max_frames} positions")
    presets = args.presets or (["small"] if cuda else ["toy", "small"])
    threads = args.threads or len(os.sched_getaffinity(0))
    bf16 = cuda if args.bf16 is None else args.bf16
    small_layers = args.small_layers or (24 if cuda else 2)
    repeats = args.repeats or (5 if cuda else 3)
    rounds = args.rounds or (1 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    base = dict(device=args.device, threads=threads, warmup=warmup, repeats=repeats, bf16=bf16)
    machine = torch.cuda.get_device_name(0) if cuda else _cpu_name()
    load = os.getloadavg()
    print(f"bench.py on {machine}, {args.device}, torch {torch.__version__}, {threads} thread(s); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if not cuda and load[0] > 0.5:  # other processes on our cores: threads wait at every parallel region
        print(f"warning: load average {load[0]:.2f} -- other work shares these CPUs; timings are unreliable "
              "(small-op work like generation and the LSTM can slow down 10-100x)")

    cases = []  # (part, label, spec)
    for preset in presets:
        layers = small_layers if preset == "small" else None
        label = small_label(layers) if preset == "small" else preset
        if "train" in args.parts:
            B = args.train_batch or ((16 if preset == "toy" else 2) * (4 if cuda else 1))
            T = args.train_frames or (500 if cuda else 100)
            spec = dict(base, part="train", preset=preset, layers=layers, batch=B, frames=T, text_len=16,
                        checkpointing=args.activation_checkpointing)
            cases.append(("train", label + ", activation checkpointing" * args.activation_checkpointing, spec))
        if "gen" in args.parts:
            T = args.gen_frames or (500 if cuda else (100 if preset == "toy" else 50))
            cases.append(("gen", label, dict(base, part="gen", preset=preset, layers=layers, batch=args.gen_batch,
                                             frames=T, text_len=16, frame_rate=50.0)))  # both codecs: 50 Hz
    if "codec" in args.parts:
        for layout in CODEC_LAYOUTS:
            secs = args.codec_seconds or (10.0 if cuda else 2.0)
            for op in ("encode", "decode"):
                cases.append((op, layout, dict(base, part="codec", op=op, layout=layout, batch=1, seconds=secs)))

    if args.decode_scaling and args.decode_profile:
        fail("--decode-scaling and --decode-profile are two separate runs; pass one")
    if args.decode_profile and cuda:
        fail("--decode-profile times on the CPU clock (no CUDA synchronisation); run it with --device cpu")
    if args.decode_scaling:
        return decode_scaling(base, small_layers, cuda, args.json)
    if args.decode_profile:
        return decode_profile(base, args.small_layers or 24, args.gen_frames or 50, args.json)
    t_start = time.perf_counter()
    results, limit_runs, limits = around_limits(base, lambda: run_cases(cases, rounds, cuda))
    total = time.perf_counter() - t_start
    peak = args.peak_tflops or _peak_tflops(machine) if cuda else None
    table = render_table(results, cuda, peak, limits)
    print(table)
    print(f"total {total:.0f} s; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, device=args.device, torch=torch.__version__, threads=threads,
                           load_before=load, load_after=os.getloadavg(), total_seconds=total, peak_tflops=peak,
                           limit_runs=limit_runs, limits=limits, results=results, table=table),
                      f, indent=1)
        print(f"wrote {args.json}")


def around_limits(base, work):
    """-> (work(), the two limit measurements, the limits used). The limits are measured before and after the work
    (a VM drifts), and the higher of the two counts: the stricter limit."""
    runs = [run_child(dict(base, part="limits", side="ours"), timeout=600)]
    out = work()
    runs.append(run_child(dict(base, part="limits", side="ours"), timeout=600))
    limits = {k: max(r[k] for r in runs) if k in ("peak_flops", "bandwidth", "read_bandwidth") else v
              for k, v in runs[0].items()}
    return out, runs, limits


def run_cases(cases, rounds, cuda):
    """The table's measurements: per case, `rounds` timing children per side, alternating, and on CPU one memory
    child per side."""
    results = []
    bar = tqdm(total=2 * len(cases) * (rounds + (not cuda)), desc="bench", unit="run", leave=False)
    for part, label, spec in cases:
        row = dict(part=part, config=label, spec=spec)
        runs = {"ours": [], "theirs": []}
        for _ in range(rounds):  # ours, theirs, ours, theirs, ...: drifts in machine speed hit both sides alike
            for side in runs:
                runs[side].append(run_child(dict(spec, side=side), timeout=1800))
                bar.update(1)
        for side, rs in runs.items():
            row[side] = min(rs, key=lambda r: abs(r["seconds"] - statistics.median(x["seconds"] for x in rs)))
            row[side]["round_seconds"] = [r["seconds"] for r in rs]
            if not cuda:  # CPU peak RSS: a separate fresh child (glibc's heap would hide reuse in the timing one)
                row[side]["peak_mib"] = run_child(dict(spec, side=side, memory_only=True), timeout=1800)["peak_mib"]
                bar.update(1)
        results.append(row)
    bar.close()
    return results


def kv_cache_bytes(cfg, batch, frames, itemsize=4):
    """lm.generate's self-attention cache: per layer keys and values (2) for the doubled CFG batch (2B) over
    S = T + K positions of width D."""
    return cfg.num_layers * 2 * 2 * batch * (frames + cfg.num_codebooks) * cfg.dim * itemsize


def decode_scaling(base, layers, cuda, json_path=None):
    """Our CFG decoding of `small` (lm.generate as sample.py runs it): per-step time against the bound of streaming
    the weights once per step, over audio length (the KV cache grows; the step should stay near flat) and over
    batch (the weights are read once for all rows: tokens/s should grow almost linearly while bandwidth-bound)."""
    cfg = bench_lm_config("small", layers)
    grid = [(1, 50), (1, 500), (1, 1500), (2, 500), (4, 500), (8, 500)]

    def measure():
        rows = []
        for B, T in tqdm(grid, desc="decode scaling", leave=False):
            spec = dict(base, part="gen", preset="small", layers=layers, batch=B, frames=T, text_len=16,
                        frame_rate=50.0, side="ours", warmup=0, repeats=1)
            r = run_child(spec, timeout=1800)
            if not cuda:
                r["peak_mib"] = run_child(dict(spec, memory_only=True), timeout=1800)["peak_mib"]
            rows.append((B, T, r))
        return rows
    rows, limit_runs, limits = around_limits(base, measure)
    bw = limits["bandwidth"]
    bound = decode_weight_bytes(cfg) / bw
    lines = [f"{small_label(layers)}, CFG 3, top-k 250; bound = {decode_weight_bytes(cfg) / 1e6:,.0f} MB of weights per step / "
             f"{bw / 1e9:.1f} GB/s = {1e3 * bound:.2f} ms",
             "| batch | audio | ms / step | of bound | tokens/s | audio s/s | peak mem | KV cache (formula) |",
             "|---|---|---|---|---|---|---|---|"]
    for B, T, r in rows:
        step = r["seconds"] / r["steps"]
        lines.append(f"| {B} | {T / 50:g} s | {1e3 * step:.2f} | {bound / step:.2f} | {r['tokens'] / r['seconds']:,.0f} "
                     f"| {r['audio_seconds'] / r['seconds']:.2f} | {fmt_mem(r['peak_mib'])} | "
                     f"{fmt_mem(kv_cache_bytes(cfg, B, T) / 2 ** 20)} |")
    table = "\n".join(lines)
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(limit_runs=limit_runs, limits=limits, rows=[dict(batch=B, frames=T, **r) for B, T, r in rows],
                           table=table), f, indent=1)
    return table


def decode_profile(base, layers, frames, json_path=None):
    """Runs case_profile between two measurements of the limits and prints it against the weight-streaming bound:
    how far removing everything but the matrix products could take the step, and how fast those products stream."""
    r, limit_runs, limits = around_limits(base, lambda: run_child(
        dict(base, part="profile", side="ours", preset="small", layers=layers, frames=frames), timeout=1800))
    table = render_profile(r, bench_lm_config("small", layers), limits["bandwidth"], frames)
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(limit_runs=limit_runs, limits=limits, profile=r, table=table), f, indent=1)
    return table


def render_profile(r, cfg, bw, frames):
    """case_profile's result against the weight-streaming bound at bandwidth `bw` (bytes/s), as markdown."""
    bound = decode_weight_bytes(cfg) / bw
    step, prod, read, gb = r["step_seconds"], r["products_seconds"], r["read_seconds"], r["weight_bytes"]
    lines = [f"{small_label(cfg.num_layers)}, batch 1, CFG 3, top-k 250, {frames} frames: {1e3 * step:.1f} ms per step; bound "
             f"{decode_weight_bytes(cfg) / 1e6:,.0f} MB / {bw / 1e9:.1f} GB/s = {1e3 * bound:.1f} ms: "
             f"**{bound / step:.2f} of bound**",
             "", "| op (torch.profiler, self time) | share of the step | calls per step |", "|---|---|---|"]
    lines += [f"| `{o['op']}` | {100 * o['share']:.1f} % | {o['calls']:.0f} |" for o in r["top"]]
    lines += ["", f"The {r['num_products']} weight products of a step alone (lm.few_rows_linear, back to back): "
              f"{1e3 * prod:.1f} ms = {gb / prod / 1e9:.1f} GB/s = **{bound / prod:.2f} of bound**, the most a step "
              f"can reach with them; everything else takes {1e3 * max(step - prod, 0):.1f} ms "
              f"({100 * max(step - prod, 0) / step:.0f} %). A plain read (sum) of the same weights: {1e3 * read:.1f} ms "
              f"= {gb / read / 1e9:.1f} GB/s = {bound / read:.2f} of bound."]
    return "\n".join(lines)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
        return f"{m.group(1).strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        return "CPU"


def _peak_tflops(name):
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return v
    return None


LIMIT_TARGETS_CPU = {"train": 0.8, "gen": 0.7}  # of the matmul peak / of the weight-streaming bound


def of_limit(part, x, limits):
    """Fraction of this machine's limit a measurement reaches: training and codec FLOP/s / matmul peak; decoding:
    the time the step's weights take to stream at the measured bandwidth / the measured step time."""
    if not limits:
        return None
    if part == "gen":
        return x["weight_bytes"] / limits["bandwidth"] / (x["seconds"] / x["steps"])
    return x["flops"] / x["seconds"] / limits["peak_flops"] if x.get("flops") else None


def probe_mismatch(o, t):
    """'' when both sides computed the same function on the probe input: equal tokens, values within 1e-3."""
    po, pt = o.get("probe", {}), t.get("probe", {})
    if po.get("tokens") != pt.get("tokens"):
        n = sum(a != b for a, b in zip(po.get("tokens", []), pt.get("tokens", [])))
        return f"{n} of {len(po.get('tokens', []))} probe tokens differ"
    vo, vt = po.get("values", []), pt.get("values", [])
    err = max((abs(a - b) for a, b in zip(vo, vt)), default=0.0)
    if err > 1e-3 * max((abs(a) for a in vo), default=0.0) + 1e-5:
        return f"probe outputs differ by up to {err:.3g}"
    return ""


def render_table(results, cuda, peak, limits=None):
    """Markdown table: absolute figures, the fraction of this machine's limit each side reaches (the verdicts on CPU
    use it), the ratio ours / theirs (information; higher is better for us), then notes."""
    lines = ["| what | config | ours | transformers | ours / theirs | of limit, ours / theirs | target | peak mem ours "
             "| peak mem theirs |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    if limits:
        notes.append(f"limits measured in this run: matmul peak {limits['peak_flops'] / 1e9:,.0f} GFLOP/s "
                     f"({limits['gemm_dtype'].replace('torch.', '')} {limits['gemm_n']}² GEMM), memory bandwidth "
                     f"{limits['bandwidth'] / 1e9:.1f} GB/s (1 GiB copy, read + write; read-only sum "
                     f"{limits['read_bandwidth'] / 1e9:.1f} GB/s)")
    for r in results:
        o, t, part, s = r["ours"], r["theirs"], r["part"], r["spec"]
        target, tgt = None if cuda else LIMIT_TARGETS_CPU.get(part), ""
        if part == "train":
            what = f"train step (B={s['batch']}, {s['frames']} frames{', bf16' if s['bf16'] else ''})"
            uo, ut = o["tokens"] / o["seconds"], t["tokens"] / t["seconds"]
            fo, ft = f"{uo:,.0f} tok/s", f"{ut:,.0f} tok/s"
            if "phases" in o:
                ph = ", ".join(f"{name} {1e3 * a:.0f} / {1e3 * b:.0f}" for name, a, b in
                               zip(("forward+loss", "backward", "clip+AdamW"), o["phases"], t["phases"]))
                notes.append(f"{r['config']} training step, median ms ours / theirs: {ph}")
            if cuda and peak:
                mfu, mfu_t = (x["flops"] / x["seconds"] / (peak * 1e12) for x in (o, t))
                if s["preset"] == "small":
                    tgt = f"MFU ≥ 40%: {100 * mfu:.1f}% {'ok' if mfu >= 0.4 else 'MISSED'}"
                notes.append(f"{r['config']} training step: {o['flops'] / 1e12:.2f} TFLOP per step (train_flops), "
                             f"{o['flops'] / o['seconds'] / 1e12:.0f} TFLOP/s = MFU {100 * mfu:.1f}% of {peak:g} "
                             f"(transformers {100 * mfu_t:.1f}%)")
        elif part == "gen":
            what = f"generate, CFG 3, top-k 250 (B={s['batch']}, {s['frames']} frames)"
            uo, ut = o["tokens"] / o["seconds"], t["tokens"] / t["seconds"]
            ao, at = o["audio_seconds"] / o["seconds"], t["audio_seconds"] / t["seconds"]
            fo, ft = f"{uo:,.0f} tok/s = {ao:.2f} audio s/s", f"{ut:,.0f} tok/s = {at:.2f} audio s/s"
            if cuda:
                tgt = f"real time: {'ok' if ao >= 1 else 'MISSED'}"
            if limits:
                notes.append(f"{r['config']} decoding step (B={s['batch']}): {o['weight_bytes'] / 1e6:,.0f} MB of "
                             f"weights / {limits['bandwidth'] / 1e9:.1f} GB/s = "
                             f"{1e3 * o['weight_bytes'] / limits['bandwidth']:.1f} ms bound; measured "
                             f"{1e3 * o['seconds'] / o['steps']:.1f} ms ours, {1e3 * t['seconds'] / t['steps']:.1f} ms "
                             "theirs")
        else:
            what = f"codec {part} ({s['seconds']:g} s audio)"
            uo, ut = o["audio_seconds"] / o["seconds"], t["audio_seconds"] / t["seconds"]
            fo, ft = f"{uo:,.1f} audio s/s", f"{ut:,.1f} audio s/s"
        ratio = uo / ut
        bad = probe_mismatch(o, t)
        if bad:
            notes.append(f"WARNING {part} {r['config']}: {bad}: the two sides may not compute the same thing")
        lo, lt = of_limit(part, o, limits), of_limit(part, t, limits)
        if target and lo is not None:
            exact = f"{lo:.3f}" if lo < target <= round(lo, 2) else f"{lo:.2f}"  # no "0.80: MISSED"
            tgt = f"≥ {target:g} of {'bound' if part == 'gen' else 'peak'}: {exact} {'ok' if lo >= target else 'MISSED'}"
        lim = "–" if lo is None else f"**{lo:.2f}** / {'–' if lt is None else f'{lt:.2f}'}"
        lines.append(f"| {what} | {r['config']} | {fo} | {ft} | {ratio:.2f}× | {lim} | {tgt} | "
                     f"{fmt_mem(o['peak_mib'])} | {fmt_mem(t['peak_mib'])} |")
    spread = [max(x["round_seconds"]) / min(x["round_seconds"]) - 1 for r in results for x in (r["ours"], r["theirs"])
              if len(x.get("round_seconds", [])) > 1]
    if spread:
        notes.append(f"spread of the {len(results[0]['ours']['round_seconds'])} timing children per side (slowest / "
                     f"fastest - 1): median {100 * statistics.median(spread):.0f}%, worst {100 * max(spread):.0f}%")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    main()
