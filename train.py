"""Train the text-to-audio LM with the paper's representation regularization (RR): PAPER.md §3.2, PAPER.md §4.2.

    python train.py                     # toy main job on CPU (= --preset toy): toy set, codec, T5, LM with RR, samples
    torchrun --nproc_per_node=16 train.py --preset audiogen-16khz --manifest train.jsonl --valid-manifest valid.jsonl \
        --codec codec.pt --t5 t5-large/ --run-dir runs/audiogen            # PAPER.md §4.2: 16 GPUs for sound
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py \
        --preset musicgen-32khz --manifest ... --codec ... --t5 t5-base/   # 32 GPUs for music
    # fine-tune released MusicGen with RR (LM and codec files of facebook/musicgen-small, a local t5-base):
    torchrun --nproc_per_node=8 train.py --preset musicgen-32khz --init-musicgen musicgen-small/state_dict.bin \
        --codec musicgen-small/compression_state_dict.bin --t5 t5-base/ --manifest ... --steps 10000 --lr 1e-5 --warmup 500

One optimisation step (Eq. 6): ONE classifier-free-guidance draw for the whole global batch, from a generator seeded by
(seed, step), so every rank and a resumed run draw the same (PAPER.md "audiocraft: CFG dropout"). On a CFG step the
caption is left out of cross-attention but still encoded, and the loss is L_uncond + rr_weight * L_rr, with L_rr
(Eq. 3-5, rr_loss.py) over the GLOBAL batch: each rank pools its samples, the pooled vectors are all-gathered with
gradient. Otherwise L_cond.
Every term is normalised by global counts, so losses and gradients do not depend on the number of ranks or on the
gradient accumulation (a test checks 2 ranks against 1). The frozen codec and T5 sit outside the FSDP2-sharded LM.
A run directory holds: lm.pt (full LM + EMA + configs, what sample.py loads), state/ (DCP resumable state: model,
optimizer, EMA, RNG; step = data position), metrics.jsonl, tokens/ (cached codec tokens), samples/ (toy).
Restarting the same command resumes from state/ (also from a moved run dir); SIGTERM or Ctrl-C saves and exits
cleanly. Resuming reads only what restricted unpicklers admit, and checks every file's SHA-256 first.
"""
import argparse
import datetime
import functools
import json
import math
import os
import pickle
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import codec as codec_lib
import data
import lm as lm_lib
import sample
import text_encoder
from rr_loss import pool_time, rr_from_pooled


# ----------------------------------------------------------------------------------------------- config
def flag(default, help, resume_free=False):
    """A TrainConfig field with its --help text. resume_free: the value may change when a run is resumed,
    because it does not change the loss trajectory (e.g. how often to save)."""
    return field(default=default, metadata=dict(help=help, resume_free=resume_free))


@dataclass
class TrainConfig:  # defaults: the paper's setup for sound (PAPER.md §4.2); PRESETS override them
    preset: str = flag("toy", "toy | audiogen-16khz | musicgen-32khz: sets every default below")
    run_dir: str = flag("runs/toy", "output directory (lm.pt, state/, metrics.jsonl, tokens/, samples/); an "
                        "existing state/ is resumed, also after the directory was moved", resume_free=True)
    manifest: str = flag("", "training manifest (data.py's JSONL or audiocraft's); toy: data/toy/train.jsonl, "
                         "made if missing")
    valid_manifest: str = flag("", "validation manifest (loss every --eval-every steps); toy: data/toy/valid.jsonl")
    test_manifest: str = flag("", "prompts of the final samples (toy: data/toy/test.jsonl)", resume_free=True)
    codec: str = flag("", "codec.py checkpoint or audiocraft compression_state_dict.bin; toy: RUN/codec/codec.pt, "
                      "trained if missing")
    t5: str = flag("", "HF-format T5 directory: t5-large for AudioGen, t5-base for MusicGen; toy: RUN/t5, made if "
                   "missing")  # PAPER.md "audiocraft: T5 conditioner"
    init_musicgen: str = flag("", "start from a released audiocraft LM state_dict.bin (fine-tuning; "
                              "lm.load_musicgen)")
    cache_dir: str = flag("", "where cached codec tokens go (default RUN/tokens)", resume_free=True)
    lm_preset: str = flag("small", "lm.LM_PRESETS name (small = the paper's 300M)")
    lm_dim: int = flag(0, "override the LM width (0: preset's)")
    lm_layers: int = flag(0, "override the LM depth (0: preset's)")
    lm_heads: int = flag(0, "override the LM heads (0: preset's)")
    meta_init: bool = flag(True, "build the LM on the meta device and initialise the shards in place (big "
                           "models); else rank 0 builds the full seeded LM and broadcasts it (the same init for "
                           "any world size)")
    segment_seconds: float = flag(10.0, "training crop length: 10 s sound, 30 s music (PAPER.md §4.2)")
    random_crop: bool = flag(True, "random crops of longer clips (else the first segment)")
    cache_tokens: bool = flag(True, "encode the audio once and train from cached tokens (crops in token space); "
                              "else encode every step", resume_free=True)
    skip_bad: bool = flag(False, "skip bad manifest items (counted, one warning) instead of stopping",
                          resume_free=True)
    steps: int = flag(100_000, "optimisation steps (PAPER.md §4.2: 100K)")
    warmup: int = flag(4_000, "linear warm-up steps before the cosine decay (4K)")
    lr: float = flag(5e-4, "peak learning rate (not in the paper: audiocraft's AdamW values, AudioGen 5e-4, "
                     "MusicGen 1e-4)")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    weight_decay: float = flag(0.1, "decoupled weight decay")
    grad_clip: float = flag(1.0, "gradient norm clip")
    global_batch: int = flag(192, "examples per step over all ranks (PAPER.md §4.2: 192)")
    micro_batch: int = flag(0, "examples per rank per forward; accumulation = global / (world * micro). 0: the "
                            "paper's per-GPU share for the paper presets (12 = 192 / 16 GPUs, or fewer on more ranks), "
                            "the whole per-rank batch for toy", resume_free=True)
    activation_checkpointing: bool = flag(False, "recompute each transformer block in the backward pass: "
                                          "activation memory of one block instead of all, ~1/3 more compute",
                                          resume_free=True)
    precision: str = flag("", "bf16 or fp32 compute (default bf16 on CUDA, fp32 on CPU); parameters, gradient "
                          "reduction and optimizer state stay fp32 (PAPER.md §4.2)", resume_free=True)
    ema_decay: float = flag(0.99, "decay of the weight EMA saved in lm.pt (sample.py uses it)")
    ema_every: int = flag(10, "EMA update every N steps (audiocraft's ema.updates = 10)")
    cfg_prob: float = flag(0.1, "probability that a step is a CFG step (text dropped for the whole global "
                           "batch): 0.1 sound, 0.3 music")
    rr_weight: float = flag(3.0, "lambda of Eq. 6 (3.0); 0 = the baseline without RR")
    rr_pool: str = flag("max", "pooling F over time: max (best) or mean")
    seed: int = flag(0, "seed of the init, the data order, the crops and the CFG draws")
    # Sampling defaults recorded in lm.pt for sample.py / evaluate.py: PAPER.md §4.2, PAPER.md "audiocraft: sampling"
    sample_cfg_coef: float = flag(3.0, "CFG coefficient that sample.py and evaluate.py use for this run unless "
                                  "given", resume_free=True)
    sample_top_k: int = flag(250, "top-k that sample.py and evaluate.py use for this run unless given",
                             resume_free=True)
    eval_every: int = flag(1000, "validation loss every N steps (and at the end)", resume_free=True)
    save_every: int = flag(1000, "write lm.pt and state/ every N steps", resume_free=True)
    max_steps_this_run: int = flag(0, "stop (saving) after N steps of this invocation (0: run to --steps); resume "
                                   "later", resume_free=True)
    samples: int = flag(0, "after training, write samples for the first N test prompts into RUN/samples (toy)",
                        resume_free=True)
    device: str = flag("", "cpu or cuda (default: cuda:LOCAL_RANK when available)", resume_free=True)
    threads: int = flag(0, "torch CPU threads per process for the LM (0: torch's default; the toy codec always "
                        "uses the default)", resume_free=True)
    pg_timeout_minutes: float = flag(10.0, "process-group timeout: a hung rank stops the others after this long "
                                     "(gloo's default is 30)", resume_free=True)
    verify: bool = flag(True, "check the SHA-256 of every checkpoint and cache file on load (--no-verify: skip; "
                        "hashing 1.2 GB costs about a second)", resume_free=True)


PRESETS = {
    # toy: 2 CPU cores, the whole main job (data, codec, T5, LM, samples) in <= 20 min (RESULTS.md "The main job")
    # Sampling: CFG 1.5 and top-k 8, chosen on the valid split (RESULTS.md "Guidance and sampling"): at the paper's
    # CFG 3 the toy LM overshoots the asked count, because its unconditional branch centres on two events.
    "toy": dict(run_dir="runs/toy", lm_preset="toy", meta_init=False, segment_seconds=2.0, steps=1500, warmup=100,
                lr=2e-3, global_batch=16, ema_every=1, cfg_prob=0.1, eval_every=500, save_every=250, samples=6,
                threads=1,  # the toy LM's ops are too small to split; spinning threads collapse on shared cores
                sample_cfg_coef=1.5, sample_top_k=8),
    # PAPER.md §4.2; CFG fractions: PAPER.md "audiocraft: CFG dropout"
    "audiogen-16khz": dict(run_dir="runs/audiogen-16khz", segment_seconds=10.0, cfg_prob=0.1),
    "musicgen-32khz": dict(run_dir="runs/musicgen-32khz", segment_seconds=30.0, cfg_prob=0.3, lr=1e-4),
}


def value_problems(cfg):
    """Every out-of-range value of cfg, as '--flag VALUE: expected RANGE' (checked before any work)."""
    between = lambda lo, x, hi: lo <= x <= hi  # False for NaN
    checks = [
        ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "> 0 and finite"),
        ("grad-clip", cfg.grad_clip > 0, "> 0 (a gradient-norm bound; inf: no clipping)"),
        ("ema-decay", 0 <= cfg.ema_decay < 1, "in [0, 1)"),
        ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
        ("weight-decay", cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay), ">= 0 and finite"),
        ("cfg-prob", between(0, cfg.cfg_prob, 1), "in [0, 1]"),
        ("rr-weight", cfg.rr_weight >= 0 and math.isfinite(cfg.rr_weight), ">= 0 and finite"),
        ("rr-pool", cfg.rr_pool in ("max", "mean"), "'max' or 'mean'"),
        ("precision", cfg.precision in ("", "bf16", "fp32"), "'bf16' or 'fp32'"),
        ("sample-cfg-coef", math.isfinite(cfg.sample_cfg_coef), "finite"),
        ("sample-top-k", cfg.sample_top_k >= 0, ">= 0"),
        ("segment-seconds", 0 < cfg.segment_seconds < math.inf, "> 0 and finite"),
        ("threads", cfg.threads >= 0, ">= 0 (0: torch's default)"),
        ("pg-timeout-minutes", cfg.pg_timeout_minutes > 0, "> 0"),
        *[(k, getattr(cfg, k.replace("-", "_")) >= 1, ">= 1")
          for k in ("steps", "global-batch", "ema-every", "eval-every", "save-every")],
        *[(k, getattr(cfg, k.replace("-", "_")) >= 0, ">= 0") for k in ("warmup", "micro-batch", "max-steps-this-run",
                                                                       "samples")],
    ]
    out = [f"--{k} {getattr(cfg, k.replace('-', '_'))!r}: expected {want}" for k, ok, want in checks if not ok]
    if cfg.cfg_prob > 0 and cfg.rr_weight > 0 and cfg.global_batch < 2:
        out.append(f"--global-batch {cfg.global_batch}: the RR loss contrasts the samples of a batch, so it needs >= 2 "
                   "(or --rr-weight 0 / --cfg-prob 0)")
    if cfg.device:
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            out.append(f"--device {cfg.device!r}: expected cpu, cuda or cuda:N")
        elif dev.type == "cuda" and not torch.cuda.is_available():
            out.append(f"--device {cfg.device!r}: this machine has no CUDA device (torch {torch.__version__}); use "
                       "--device cpu")
    if cfg.preset == "toy" and cfg.codec == os.path.join(cfg.run_dir, "codec", "codec.pt"):  # known before training it
        frames = cfg.segment_seconds * codec_lib.CODEC_PRESETS["toy"].sample_rate / math.prod(
            codec_lib.CODEC_PRESETS["toy"].ratios)
        positions = lm_lib.LM_PRESETS.get(cfg.lm_preset, {}).get("max_frames", lm_lib.LMConfig.max_frames)
        if frames > positions:
            out.append(segment_problem(cfg, math.ceil(frames), positions))
    return out


def segment_problem(cfg, frames, positions):
    return (f"--segment-seconds {cfg.segment_seconds}: {frames} codec frames, the LM has positions for {positions}; "
            f"expected <= {positions} frames")


def parse_config(argv=None):
    ap = argparse.ArgumentParser(description="Train the LM with representation regularization (PAPER.md §3.2). "
                                 "Defaults: the paper's (audiogen-16khz); the toy preset's where they differ.")
    for f in fields(TrainConfig):
        toy = PRESETS["toy"].get(f.name, f.default)
        dflt = f"default {f.default!r}" + (f", toy {toy!r}" if toy != f.default else "")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        ap.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{f.metadata['help']} ({dflt})", **kind)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "toy")
    if preset not in PRESETS:
        raise SystemExit(f"train.py: error: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    cfg = TrainConfig(**{**PRESETS[preset], **given})
    toy = preset == "toy"
    cfg.manifest = cfg.manifest or ("data/toy/train.jsonl" if toy else "")
    toy_data = toy and cfg.manifest.startswith("data/toy/")
    cfg.valid_manifest = cfg.valid_manifest or ("data/toy/valid.jsonl" if toy_data else "")
    cfg.test_manifest = cfg.test_manifest or ("data/toy/test.jsonl" if toy_data else "")
    cfg.codec = cfg.codec or (os.path.join(cfg.run_dir, "codec", "codec.pt") if toy else "")
    cfg.t5 = cfg.t5 or (os.path.join(cfg.run_dir, "t5") if toy else "")
    problems = [f"--{k.replace('_', '-')} is required for preset {preset!r}" for k in ("manifest", "codec", "t5")
                if not getattr(cfg, k)] + value_problems(cfg)
    if problems:
        raise SystemExit("train.py: error: " + "; ".join(problems))
    return cfg


PAPER_MICRO_BATCH = 12  # PAPER.md §4.2: 192 clips on 16 GPUs


def batch_split(cfg, world):
    """-> micro_batch, the examples per rank per forward; the global batch is reached by gradient accumulation, which
    leaves the losses unchanged. Default: toy, the whole per-rank batch; the paper presets, the paper's per-GPU
    share (the largest divisor of the per-rank batch up to 12), so that one GPU does not hold all 192 clips."""
    if cfg.global_batch % world:
        raise SystemExit(f"train.py: error: --global-batch {cfg.global_batch} does not split over {world} ranks; "
                         f"expected a multiple of {world}")
    per_rank = cfg.global_batch // world
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    if cfg.micro_batch and per_rank % cfg.micro_batch:
        raise SystemExit(f"train.py: error: --micro-batch {cfg.micro_batch} does not divide the per-rank batch "
                         f"{per_rank} (--global-batch {cfg.global_batch} / {world} rank{'s' * (world > 1)}); expected "
                         f"one of {divisors[:12]}{' ...' * (len(divisors) > 12)}")
    if cfg.micro_batch:
        return cfg.micro_batch
    return per_rank if cfg.preset == "toy" else max(d for d in divisors if d <= PAPER_MICRO_BATCH)


# ----------------------------------------------------------------------------------------------- distributed
def init_distributed(cfg):
    """Process group: gloo on CPU, nccl on CUDA; torchrun's env if present, else a world of one (no launcher)."""
    cuda = torch.cuda.is_available() and not cfg.device.startswith("cpu")
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(minutes=cfg.pg_timeout_minutes)  # a hung rank stops the others after this
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    device = torch.device(cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


class GatherRows(torch.autograd.Function):
    """all-gather (b, D) rows of every rank -> (world * b, D) in rank order. Backward: every rank computed the
    same global loss, so the gradient of a rank's rows is the SUM over ranks of what each computed (an
    all-reduce)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g.chunk(dist.get_world_size())[dist.get_rank()]


# ----------------------------------------------------------------------------------------------- data order
PERM, CFG = 2**32 - 1, 2**32 - 2  # third seed words of the permutation / CFG streams (crops use the item index)


@functools.lru_cache(maxsize=4)
def permutation(seed, epoch, n):
    return data.rng(seed, epoch, PERM).permutation(n)


def global_pairs(step, cfg, n):
    """(epoch, item) pairs of the step's global batch: one seeded permutation per epoch, so the data position of a
    resumed run is just the step."""
    return [(s // n, int(permutation(cfg.seed, s // n, n)[s % n]))
            for s in range(step * cfg.global_batch, (step + 1) * cfg.global_batch)]


def cfg_dropped(cfg, step):
    """One CFG decision per step for the whole global batch, the same on every rank (PAPER.md
    "audiocraft: CFG dropout")."""
    return bool(data.rng(cfg.seed, step, CFG).random() < cfg.cfg_prob)


def encode_text(t5, texts, length=None):
    """T5 output (B, L, Dt) + mask (B, L), zero-padded to L = `length` tokens, or with length None to the longest
    caption of the GLOBAL batch: zero text positions still take softmax mass in cross-attention (PAPER.md
    "audiocraft: cross-attention and padding"), so all samples of a step are padded alike and nothing depends on
    how the batch is split over ranks / micro-batches."""
    with torch.no_grad():
        emb, mask = t5.encode(list(texts))
    if length is None:
        length = int(data.all_reduce(torch.tensor(emb.shape[1], device=emb.device), dist.ReduceOp.MAX))
    pad = length - emb.shape[1]
    return F.pad(emb, (0, 0, 0, pad)), F.pad(mask, (0, pad))


# ----------------------------------------------------------------------------------------------- model
def released_lm(cfg, rank):
    """--init-musicgen (fine-tuning): rank 0 reads the released LM, before any other work, so that an unsupported
    checkpoint (melody, stereo) costs nothing -> (the full AudioLM on rank 0, else None; its LMConfig on every
    rank)."""
    full, err = None, None
    if rank == 0:
        try:
            full = lm_lib.load_musicgen(cfg.init_musicgen)
        except (OSError, ValueError) as e:
            err = str(e)
    try:
        data.fail_together(err)
    except ValueError as e:
        raise SystemExit(f"train.py: error: --init-musicgen: {e}")
    box = [full.cfg if rank == 0 else None]
    dist.broadcast_object_list(box)
    return full, box[0]


def build_lm(cfg, codec, t5, seg_frames, rank, device, released=None):
    """AudioLM sharded with FSDP2 (per transformer block, then the root; a plain module in a world of one); the codec
    and T5 stay outside. released: released_lm's (full model, LMConfig) when fine-tuning; the shards are
    broadcast from rank 0."""
    full = None
    if released:
        full, lm_cfg = released
    else:
        try:
            lm_cfg = lm_lib.lm_config(cfg.lm_preset, num_codebooks=codec.num_codebooks, card=codec.cardinality,
                                      text_dim=t5.dim, dim=cfg.lm_dim or None, num_layers=cfg.lm_layers or None,
                                      num_heads=cfg.lm_heads or None)
        except ValueError as e:
            raise SystemExit(f"train.py: error: {e}")
        if not cfg.meta_init and rank == 0:
            torch.manual_seed(cfg.seed)
            full = lm_lib.AudioLM(lm_cfg)
    try:
        lm_lib.check_compatible(codec, t5, lm_cfg, cfg.init_musicgen or "LM config")
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")
    if seg_frames > lm_cfg.max_frames:
        raise SystemExit(f"train.py: error: {segment_problem(cfg, seg_frames, lm_cfg.max_frames)}")
    with torch.device("meta"):
        model = lm_lib.AudioLM(lm_cfg)
    lm_lib.checkpoint_blocks(model, cfg.activation_checkpointing)  # before fully_shard wraps the blocks
    if dist.get_world_size() > 1:  # a world of one skips FSDP2: its unshard / reduce copies would only cost time
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.precision == "bf16"
              else MixedPrecisionPolicy())  # PAPER.md §4.2: bf16 compute; fp32 gradient reduction
        for block in model.transformer.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    if released or not cfg.meta_init:
        set_model_state_dict(model, full.state_dict() if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        torch.manual_seed(cfg.seed)
        model.reset_parameters()  # in place on the shards: no rank ever holds the full model
    with torch.no_grad():
        model.pos_emb.copy_(lm_lib.sin_embedding(*model.pos_emb.shape))  # a non-persistent buffer, lost by to_empty
    return model


def lm_forward(model, codes, text, text_mask, drop_text, frame_mask, precision="fp32"):
    """lm.lm_loss: Eq. 1 (drop_text False) / Eq. 2 (True) as per-codebook SUMS and counts, which the caller
    averages over the global batch, plus the hidden states the RR loss pools (PAPER.md §3.2). precision bf16
    (PAPER.md §4.2): FSDP2's MixedPrecisionPolicy when sharded, autocast in a world of one; either way the
    parameters stay fp32 and the cross-entropy is taken in fp32."""
    bf16 = precision == "bf16" and not isinstance(model, FSDPModule)
    with torch.autocast(codes.device.type, torch.bfloat16, enabled=bf16):
        return lm_lib.lm_loss(model, codes, text, text_mask, drop_text, frame_mask)


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to 0 at --steps (PAPER.md §4.2)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))


# ----------------------------------------------------------------------------------------------- checkpoints
def full_state(model, ema):
    """Full (unsharded) LM and EMA state dicts on rank 0's CPU (a collective: every rank calls it)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_sd = {}
    for k, v in ema.items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        if dist.get_rank() == 0:
            ema_sd[k] = v.detach().cpu().clone()
    return sd, ema_sd


def run_relative(path, run_dir):
    """codec / T5 reference in lm.pt: relative to the run dir when inside it (so the run can move), else absolute."""
    p, r = os.path.abspath(path), os.path.abspath(run_dir)
    return os.path.relpath(p, r) if p.startswith(r + os.sep) else p


# The resumable state is torch.distributed.checkpoint's format, which pickles: its .metadata, and the optimizer's
# non-tensor values (lr, betas) as torch.save blobs that its default planner reads with weights_only=False. A run
# directory may come from someone else, so both go through restricted unpicklers first, and nothing else is read.
DCP_METADATA_TYPES = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization",
    "_get_layout"), ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict")}


class MetadataUnpickler(pickle.Unpickler):
    """Admits only the types torch writes into a DCP .metadata (and torch dtypes); anything else is refused."""

    def find_class(self, module, name):
        if (module, name) in DCP_METADATA_TYPES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a type of checkpoint metadata")


def check_metadata(path):
    """Unpickle a DCP .metadata with MetadataUnpickler; ValueError naming the file if it holds anything else."""
    try:
        with open(path, "rb") as f:
            MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 -- foreign or damaged: refuse, naming the file
        raise ValueError(f"{path}: refused: not checkpoint metadata torch wrote ({e})") from None


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        check_metadata(self._get_metadata_path(kwargs.get("rank")))  # the same bytes the reader then unpickles
        return super().read_metadata(*args, **kwargs)


class SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)  # the same bytes the planner then loads
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"refused checkpoint value {read_item.dest_index.fqn}: {str(e).splitlines()[0]}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


SUMS = "SHA256SUMS"  # in state/: sha256sum format, every file of the checkpoint


def write_state_sums(tmp, rank):
    """Each rank hashes the DCP files it wrote (__RANK_*.distcp; rank 0 also .metadata and train_state.json);
    rank 0 writes them all to tmp/SHA256SUMS (check with `cd state && sha256sum -c SHA256SUMS`)."""
    names = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_") or
                   (rank == 0 and n in (".metadata", "train_state.json")))
    mine = {n: data.sha256_file(os.path.join(tmp, n)) for n in names}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank == 0:
        sums = {k: v for d in every for k, v in d.items()}
        data.atomic_write(os.path.join(tmp, SUMS), "".join(f"{v}  {k}\n" for k, v in sorted(sums.items())))


def save_checkpoint(model, opt, ema, step, cfg, world):
    """lm.pt (rank 0, atomic, with its SHA-256 sidecar) and the resumable DCP state (written to state.tmp/ with a
    SHA256SUMS, then renamed to state/). A failed write (disk full) is an OSError on every rank; the previous
    checkpoint is untouched."""
    rank = dist.get_rank()
    sd, ema_sd = full_state(model, ema)
    final = os.path.join(cfg.run_dir, "state")
    tmp, old = final + ".tmp", final + ".old"
    err = None
    if rank == 0:
        try:
            data.atomic_save(dict(lm_config=asdict(model.cfg), lm=sd, lm_ema=ema_sd, train_config=asdict(cfg),
                                  step=step, codec=run_relative(cfg.codec, cfg.run_dir),
                                  t5=run_relative(cfg.t5, cfg.run_dir)), os.path.join(cfg.run_dir, "lm.pt"))
        except OSError as e:
            err = str(e)
        shutil.rmtree(tmp, ignore_errors=True)
    data.fail_together(err, OSError)
    try:
        dcp.save(dict(model=get_model_state_dict(model), optim=get_optimizer_state_dict(model, opt), ema=ema,
                      rng=torch.get_rng_state()), checkpoint_id=tmp)
        err = None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 -- DCP wraps every rank's OSError
        err = f"cannot write {tmp}: {str(e).splitlines()[-1][:300]}"
    try:
        data.fail_together(err, OSError)
        if rank == 0:
            data.atomic_write(os.path.join(tmp, "train_state.json"), json.dumps(
                dict(step=step, samples_seen=step * cfg.global_batch, world_size=world, train_config=asdict(cfg),
                     manifest_sha256=data.sha256_file(cfg.manifest)), indent=1))
        write_state_sums(tmp, rank)
    except OSError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if rank == 0:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def comparable(c):
    """A train_config dict -> the values a resume must match: the codec and T5 paths relative to the run dir when
    inside it, so a run that was moved or copied still matches."""
    return {**c, **{k: run_relative(c[k], c["run_dir"]) for k in ("codec", "t5") if c.get(k)}}


def resume_point(cfg):
    """-> (state dir, its train_state.json) to resume from, or None. Checked before any work: every file against
    the checkpoint's SHA256SUMS (ranks share the hashing; unless --no-verify), the config, and the training
    manifest (its bytes: a changed manifest would change the data order)."""
    final = os.path.join(cfg.run_dir, "state")
    path = final if os.path.exists(final) else final + ".old"  # .old: a crash between the two renames
    if not os.path.exists(os.path.join(path, "train_state.json")):
        return None
    err = None
    try:
        if cfg.verify:
            if not os.path.isfile(os.path.join(path, SUMS)):
                raise ValueError(f"{path}: no {SUMS} (written by an older train.py?); resume with --no-verify")
            with open(os.path.join(path, SUMS)) as f:
                sums = [line.split(None, 1) for line in f if line.strip()]
            rank, world = dist.get_rank(), dist.get_world_size()
            for digest, name in sums[rank::world]:
                data.verify_checksum(os.path.join(path, name.strip()), [digest], os.path.join(path, SUMS))
        check_metadata(os.path.join(path, ".metadata"))  # before DCP's own reader sees it (SafeReader: again)
        with open(os.path.join(path, "train_state.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        err = str(e) if isinstance(e, ValueError) and str(e).startswith(path) else f"{path}: {e}"
    data.fail_together(err)
    saved, now = comparable(meta["train_config"]), comparable(asdict(cfg))
    free = {f.name for f in fields(TrainConfig) if f.metadata["resume_free"]}
    diff = [f"{k} (saved {saved.get(k)!r}, now {now[k]!r})" for k in now if k not in free and saved.get(k) != now[k]]
    if "manifest_sha256" in meta and os.path.isfile(cfg.manifest) and \
            meta["manifest_sha256"] != data.sha256_file(cfg.manifest):
        diff.append(f"the contents of {cfg.manifest} (it changed since step {meta['step']}: the data order would)")
    if diff:
        raise ValueError(f"cannot resume {path}: the config differs in {', '.join(diff)}. Use the saved values, "
                         f"another --run-dir, or delete {path} to start over.")
    return path, meta


def load_state(model, opt, ema, path):
    """Fill the model, optimizer, EMA and RNG from the DCP state `path` (resume_point) in place -> its step."""
    sd = dict(model=get_model_state_dict(model), optim=get_optimizer_state_dict(model, opt), ema=ema,
              rng=torch.get_rng_state())
    try:
        dcp.load(sd, storage_reader=SafeReader(path), planner=SafePlanner())  # the EMA shards are filled directly
    except (Exception, CheckpointException) as e:  # noqa: BLE001 -- DCP wraps each rank's error (a BaseException)
        msg = str(e)
        raise ValueError(next((line for line in msg.splitlines() if "refused" in line), msg.splitlines()[-1])) \
            from None
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    torch.set_rng_state(sd["rng"])
    with open(os.path.join(path, "train_state.json")) as f:
        return int(json.load(f)["step"])


# ----------------------------------------------------------------------------------------------- steps
def train_step(model, t5, src, step, cfg, micro_batch, device):
    """One optimisation step's forward/backward on this rank (Eq. 6) -> dict of global (all-reduced) values."""
    rank, world = dist.get_rank(), dist.get_world_size()
    b = cfg.global_batch // world
    drop = cfg_dropped(cfg, step)
    rr_on = drop and cfg.rr_weight > 0
    codes, fmask, texts = src.batch(global_pairs(step, cfg, len(src))[rank * b:(rank + 1) * b], device)  # (b, K, T)
    K, T = codes.shape[1:]
    text, tmask = encode_text(t5, texts)  # encoded on CFG steps too: RR needs T_b
    # global token counts per codebook: every CE term is divided by them, whatever the ranks / accumulation
    counts = data.all_reduce((lm_lib.delay_valid_mask(K, T, device)[None] & fmask[:, None]).sum((0, 2)).float())
    micro = [slice(i, i + micro_batch) for i in range(0, b, micro_batch)]
    if rr_on:
        t_all = GatherRows.apply(pool_time(text, tmask, cfg.rr_pool))  # (G, Dt): T_b of the global batch
        if len(micro) > 1:  # accumulation: every micro-batch needs the pooled audio of the others (no grad)
            with torch.no_grad():
                a_rest = torch.cat([pool_time(o["hidden"], o["hidden_mask"], cfg.rr_pool).float() for o in
                                    (lm_forward(model, codes[s], text[s], tmask[s], True, fmask[s], cfg.precision) for s in micro)])
    ce_sum, rr = torch.zeros(K, device=device), None
    for s in micro:
        out = lm_forward(model, codes[s], text[s], tmask[s], drop, fmask[s], cfg.precision)
        # FSDP averages gradients over ranks: a rank's share of a global mean is scaled by the world size
        loss = world * (out["ce_sum"] / counts.clamp(min=1)).mean()  # per-codebook means, averaged
        if rr_on:
            a = pool_time(out["hidden"], out["hidden_mask"], cfg.rr_pool).float()  # (m, D): A_b of this micro-batch
            if len(micro) > 1:  # only this micro-batch's rows carry gradient; summed over micro-batches = exact
                a = torch.cat([a_rest[:s.start], a, a_rest[s.stop:]])
            rr = rr_from_pooled(t_all, GatherRows.apply(a))  # Eq. 3-5 over the global batch
            loss = loss + cfg.rr_weight * rr  # Eq. 6; all-gather's backward sums the ranks' shares
        loss.backward()
        ce_sum += out["ce_sum"].detach()
        if s is not micro[-1] and data.all_reduce(torch.tensor(float(STOP["flag"]), device=device)).item():
            return None  # a stop between micro-batches: the step is dropped and redone on resume
    stats = data.all_reduce(torch.cat([ce_sum, torch.tensor([float(drop), float(STOP["flag"])], device=device)]))
    ce = (stats[:K] / counts.clamp(min=1)).mean().item()
    rr = rr.item() if rr is not None else None
    return dict(loss=ce + cfg.rr_weight * (rr or 0.0), ce=ce, rr=rr, cfg=drop, cfg_ranks=int(stats[K].item()),
                stop=bool(stats[K + 1].item()), tokens=cfg.global_batch * K * T)


@torch.no_grad()
def validate(model, t5, src, cfg, micro_batch, device, length):
    """Conditional CE of the validation set (first segments), split over ALL ranks (FSDP needs every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(src)
    per = math.ceil(n / (world * micro_batch)) * micro_batch  # items per rank, padded with weight-0 repeats
    idx = list(range(rank * per, (rank + 1) * per))
    sums, counts = 0, 0
    for i in range(0, per, micro_batch):
        chunk = idx[i:i + micro_batch]
        codes, fmask, texts = src.batch([(0, j % n) for j in chunk], device)
        fmask = fmask & torch.tensor([j < n for j in chunk], device=device)[:, None]
        text, tmask = encode_text(t5, texts, length)
        out = lm_forward(model, codes, text, tmask, False, fmask, cfg.precision)
        sums, counts = sums + out["ce_sum"], counts + out["count"]
    stats = data.all_reduce(torch.stack([sums, counts.float()]))
    return (stats[0] / stats[1].clamp(min=1)).mean().item()


STOP = {"flag": False, "signal": None}


def _on_stop_signal(signum, frame):
    """SIGTERM / the first Ctrl-C: save and exit after this step (or micro-batch; all ranks agree via an
    all-reduce). A second Ctrl-C quits at once, saving nothing more."""
    if STOP["flag"] and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP["flag"], STOP["signal"] = True, signal.Signals(signum).name
    if signum == signal.SIGINT and dist.get_rank() == 0:
        tqdm.write("Ctrl-C: saving after this step (Ctrl-C again to quit without saving)")


def metrics_until(path, step):
    """The lines of metrics.jsonl up to `step` (a resumed run rewrites the rest). A torn line (a write cut short by
    a power loss) is dropped with a warning."""
    keep = []
    for i, line in enumerate(open(path).read().splitlines() if os.path.exists(path) else [], 1):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            tqdm.write(f"warning: {path} line {i} is torn or not a metrics record; dropped: {line[:80]!r}")
    return keep


def save(model, opt, ema, step, cfg, world, last_saved):
    """save_checkpoint -> step; a failed write stops training with one line (the last good checkpoint is kept)."""
    try:
        save_checkpoint(model, opt, ema, step, cfg, world)
    except OSError as e:
        raise SystemExit(f"train.py: error: {e}; stopped at step {step}, the last good checkpoint (step {last_saved})"
                         f" in {cfg.run_dir} is kept") from None
    return step


def train(model, opt, ema, t5, src, val, step, cfg, micro_batch, device):
    """The training loop from `step` to cfg.steps (or a stop) -> True when training is finished."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(cfg.run_dir, exist_ok=True)
    mpath = os.path.join(cfg.run_dir, "metrics.jsonl")
    if rank == 0:  # a resumed run rewrites the steps after its checkpoint
        data.atomic_write(mpath, "".join(line + "\n" for line in metrics_until(mpath, step)))
    metrics = open(mpath, "a") if rank == 0 else None
    val_len = t5.tokenizer(val.texts)[0].shape[1] if val else 0  # pad to the longest validation caption
    params = list(model.parameters())
    STOP["flag"] = False
    prev = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    start, last_saved = step, step
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="train")
    try:
        while step < cfg.steps:
            t0 = time.time()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            r = train_step(model, t5, src, step, cfg, micro_batch, device)
            if r is None:  # stopped between micro-batches
                opt.zero_grad(set_to_none=True)
                save(model, opt, ema, step, cfg, world, last_saved)
                if rank == 0:
                    tqdm.write(f"stopped at step {step} ({STOP['signal']}); state saved in {cfg.run_dir}/state, run "
                               "the same command to resume")
                break
            if r["cfg_ranks"] not in (0, world):
                raise RuntimeError(f"step {step}: ranks disagree on the CFG draw ({r['cfg_ranks']} of {world} dropped)")
            if not math.isfinite(r["loss"]):
                raise SystemExit(f"train.py: error: non-finite loss {r['loss']} at step {step + 1}; stopped, the last "
                                 f"good checkpoint (step {last_saved}) in {cfg.run_dir} is kept")
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            gnorm = gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.ema_every == 0:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params], 1 - cfg.ema_decay)
            dt = time.time() - t0
            rec = dict(step=step, loss=r["loss"], ce=r["ce"], rr=r["rr"], cfg=r["cfg"], cfg_ranks=r["cfg_ranks"],
                       lr=lr, grad_norm=gnorm.item(), tok_s=r["tokens"] / dt)
            if val and (step % cfg.eval_every == 0 or step == cfg.steps):
                rec["val_ce"] = validate(model, t5, val, cfg, micro_batch, device, val_len)
                if rank == 0:
                    tqdm.write(f"step {step}: val_ce {rec['val_ce']:.4f}")
            if rank == 0:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{r['loss']:.3f}", ce=f"{r['ce']:.3f}", rr="-" if r["rr"] is None else
                                f"{r['rr']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_s']:.0f}")
            stop = r["stop"] or (cfg.max_steps_this_run and step - start >= cfg.max_steps_this_run)
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                last_saved = save(model, opt, ema, step, cfg, world, last_saved)
            if stop:
                if rank == 0:
                    tqdm.write(f"stopped at step {step} ({STOP['signal'] if r['stop'] else '--max-steps-this-run'}); "
                               f"state saved in {cfg.run_dir}/state, run the same command to resume")
                break
        return step >= cfg.steps
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)
        bar.close()
        if metrics:
            metrics.close()


# ----------------------------------------------------------------------------------------------- main
def prepare_toy(cfg, rank):
    """Toy main job: the toy set, codec and T5 are made on first use (rank 0 makes them, the others wait)."""
    if rank == 0:
        if cfg.manifest.startswith("data/toy/"):
            data.ensure_toy_dataset("data/toy")
        out = os.path.dirname(cfg.codec)
        if cfg.codec == os.path.join(cfg.run_dir, "codec", "codec.pt"):  # ours to make: train, or finish a stopped one
            ck = data.torch_load(cfg.codec, "codec checkpoint") if os.path.exists(cfg.codec) else {}
            codec_run = ck.get("run") or {}
            if not ck or ck.get("step", 0) < codec_run.get("steps", 0):
                print(f"toy codec -> {out} (codec.train_codec)")
                codec_lib.train_codec(cfg.manifest, out, valid=cfg.valid_manifest or None, preset="toy",
                                      steps=codec_run.get("steps"), resume=True)
        if not os.path.exists(os.path.join(cfg.t5, "config.json")):  # written last by make_toy_t5
            items, _ = data.read_manifest(cfg.manifest, skip_bad=cfg.skip_bad)
            text_encoder.make_toy_t5(cfg.t5, [it["text"] for it in items], seed=cfg.seed)
    dist.barrier()


def run(cfg):
    """The whole job: set-up (process group, toy assets, codec, T5, data, LM, optimizer, resume), the training
    loop, then the samples."""
    rank, world, device = init_distributed(cfg)
    verify_before, data.VERIFY = data.VERIFY, cfg.verify
    try:
        micro_batch = batch_split(cfg, world)
        cfg.precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
        if rank == 0:
            acc = cfg.global_batch // (world * micro_batch)
            print(f"global batch {cfg.global_batch} = {world} rank{'s' * (world > 1)} × micro-batch {micro_batch} × "
                  f"{acc} accumulation step{'s' * (acc > 1)}; {cfg.precision} compute" +
                  ", activation checkpointing" * cfg.activation_checkpointing)
        try:
            resume = resume_point(cfg)  # before any work: a refused resume costs nothing
        except ValueError as e:
            raise SystemExit(f"train.py: error: {e}")
        released = released_lm(cfg, rank) if cfg.init_musicgen else None
        if cfg.preset == "toy":  # with torch's default threads: the codec's convolutions use every core (2x on 2)
            prepare_toy(cfg, rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            codec = codec_lib.load_codec(cfg.codec, device=device)
            t5 = text_encoder.load_t5(cfg.t5, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: error: {e}")
        seg = math.ceil(round(cfg.segment_seconds * codec.sample_rate) / codec.hop_length)  # frames per crop
        if seg < codec.num_codebooks:
            raise SystemExit(f"train.py: error: --segment-seconds {cfg.segment_seconds} gives {seg} frames; the "
                             f"delay pattern needs >= {codec.num_codebooks}")
        positions = released[1].max_frames if released else lm_lib.LM_PRESETS.get(cfg.lm_preset, {}).get(
            "max_frames", lm_lib.LMConfig.max_frames)
        if seg > positions:  # before caching
            raise SystemExit(f"train.py: error: {segment_problem(cfg, seg, positions)}")
        try:
            src = data.make_source(cfg.manifest, codec, cfg, seg, cfg.random_crop, rank, world, device)
            val = (data.make_source(cfg.valid_manifest, codec, cfg, seg, False, rank, world, device)
                   if cfg.valid_manifest else None)
        except (ValueError, OSError) as e:  # bad data, or a token cache that cannot be written
            raise SystemExit(f"train.py: error: {e}")
        model = build_lm(cfg, codec, t5, seg, rank, device, released)
        released = None  # rank 0's full copy: its weights now live in the model
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=True)  # decay on every weight, as audiocraft
        ema = {k: p.detach().clone() for k, p in model.named_parameters()}  # sharded like the params
        try:
            step = load_state(model, opt, ema, resume[0]) if resume else 0
        except ValueError as e:
            raise SystemExit(f"train.py: error: {e}")
        done = train(model, opt, ema, t5, src, val, step, cfg, micro_batch, device)
    finally:
        dist.destroy_process_group()
        data.VERIFY = verify_before
    if rank == 0 and done and cfg.samples and cfg.test_manifest:
        prompts = list(dict.fromkeys(it["text"] for it in data.read_manifest(cfg.test_manifest, skip_bad=True)[0]))
        sample.main(["--ckpt", cfg.run_dir, "--seed", str(cfg.seed), "--device", str(device), *prompts[:cfg.samples]])


def main(argv=None):
    cfg = parse_config(argv)
    try:
        run(cfg)
    except KeyboardInterrupt:  # outside the training loop (set-up, caching, the toy codec), or a second Ctrl-C
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: interrupted; {cfg.run_dir} keeps its last saved state (run the same command to resume)")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
