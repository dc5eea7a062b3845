"""Train the text-to-audio LM with the paper's representation regularization (RR), PAPER.md §2-§3.

    python train.py                     # toy main job on CPU (= --preset toy): toy set, codec, T5, LM with RR, samples
    torchrun --nproc_per_node=16 train.py --preset audiogen-16khz --manifest train.jsonl --valid-manifest valid.jsonl \
        --codec codec.pt --t5 t5-large/ --run-dir runs/audiogen            # PAPER.md §3: 16 GPUs for sound
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py \
        --preset musicgen-32khz --manifest ... --codec ... --t5 t5-base/   # 32 GPUs for music
    # fine-tune released MusicGen with RR (LM and codec files of facebook/musicgen-small, a local t5-base):
    torchrun --nproc_per_node=8 train.py --preset musicgen-32khz --init-musicgen musicgen-small/state_dict.bin \
        --codec musicgen-small/compression_state_dict.bin --t5 t5-base/ --manifest ... --steps 10000 --lr 1e-5 --warmup 500

One optimisation step (Eq. 6): ONE classifier-free-guidance draw for the whole global batch, from a generator seeded by
(seed, step), so every rank and a resumed run draw the same (PAPER.md §5). On a CFG step the caption is left out of
cross-attention but still encoded, and the loss is L_uncond + rr_weight * L_rr, with L_rr (Eq. 3-5, rr_loss.py) over
the GLOBAL batch: each rank pools its samples, the pooled vectors are all-gathered with gradient. Otherwise L_cond.
Every term is normalised by global counts, so losses and gradients do not depend on the number of ranks or on the
gradient accumulation (a test checks 2 ranks against 1). The frozen codec and T5 sit outside the FSDP2-sharded LM.
A run directory holds: lm.pt (full LM + EMA + configs, what sample.py loads), state/ (DCP resumable state: model,
optimizer, EMA, RNG; step = data position), metrics.jsonl, tokens/ (cached codec tokens), samples/ (toy).
Restarting the same command resumes from state/; SIGTERM saves and exits cleanly.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import codec as codec_lib
import data
import lm as LM
import sample
import text_encoder
from rr_loss import pool_time, rr_from_pooled


# ----------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:  # defaults = the paper's setup, PAPER.md §3 (sound); presets override
    preset: str = "toy"
    run_dir: str = "runs/toy"
    manifest: str = ""
    valid_manifest: str = ""
    test_manifest: str = ""
    codec: str = ""
    t5: str = ""
    init_musicgen: str = ""
    cache_dir: str = ""
    lm_preset: str = "small"
    lm_dim: int = 0
    lm_layers: int = 0
    lm_heads: int = 0
    meta_init: bool = True
    segment_seconds: float = 10.0
    random_crop: bool = True
    cache_tokens: bool = True
    skip_bad: bool = False
    steps: int = 100_000
    warmup: int = 4_000
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    global_batch: int = 192
    micro_batch: int = 0
    ema_decay: float = 0.99
    ema_every: int = 10
    cfg_prob: float = 0.1
    rr_weight: float = 3.0
    rr_pool: str = "max"
    seed: int = 0
    eval_every: int = 1000
    save_every: int = 1000
    max_steps_this_run: int = 0
    samples: int = 0
    device: str = ""
    threads: int = 0


HELP = dict(
    preset="toy | audiogen-16khz | musicgen-32khz: sets every default below",
    run_dir="output directory (lm.pt, state/, metrics.jsonl, tokens/, samples/); an existing state/ is resumed",
    manifest="training manifest (data.py's JSONL or audiocraft's); toy: data/toy/train.jsonl, made if missing",
    valid_manifest="validation manifest (loss every --eval-every steps); toy: data/toy/valid.jsonl",
    test_manifest="prompts of the final samples (toy: data/toy/test.jsonl)",
    codec="codec.py checkpoint or audiocraft compression_state_dict.bin; toy: RUN/codec/codec.pt, trained if missing",
    t5="HF-format T5 directory (t5-large for AudioGen, t5-base for MusicGen, PAPER.md §5); toy: RUN/t5, made if missing",
    init_musicgen="start from a released audiocraft LM state_dict.bin (fine-tuning; lm.load_musicgen)",
    cache_dir="where cached codec tokens go (default RUN/tokens)",
    lm_preset="lm.LM_PRESETS name (small = the paper's 300M)", lm_dim="override the LM width (0: preset's)",
    lm_layers="override the LM depth (0: preset's)", lm_heads="override the LM heads (0: preset's)",
    meta_init="build the LM on the meta device and initialise the shards in place (big models); else rank 0 builds "
              "the full seeded LM and broadcasts it (the same init for any world size)",
    segment_seconds="training crop length: 10 s sound, 30 s music (PAPER.md §3)",
    random_crop="random crops of longer clips (else the first segment)",
    cache_tokens="encode the audio once and train from cached tokens (crops in token space); else encode every step",
    skip_bad="skip bad manifest items (counted, one warning) instead of stopping",
    steps="optimisation steps (PAPER.md §3: 100K)", warmup="linear warm-up steps before the cosine decay (4K)",
    lr="peak learning rate (not in the paper: audiocraft's AdamW values, AudioGen 5e-4, MusicGen 1e-4)", beta1="AdamW beta1", beta2="AdamW beta2",
    weight_decay="decoupled weight decay", grad_clip="gradient norm clip",
    global_batch="examples per step over all ranks (PAPER.md §3: 192)",
    micro_batch="examples per rank per forward (0: global_batch / world size); accumulation = global / (world * micro)",
    ema_decay="decay of the weight EMA saved in lm.pt (sample.py uses it)",
    ema_every="EMA update every N steps (audiocraft's ema.updates = 10)",
    cfg_prob="probability that a step is a CFG step (text dropped for the whole global batch): 0.1 sound, 0.3 music",
    rr_weight="lambda of Eq. 6 (3.0); 0 = the baseline without RR", rr_pool="pooling F over time: max (best) or mean",
    seed="seed of the init, the data order, the crops and the CFG draws",
    eval_every="validation loss every N steps (and at the end)", save_every="write lm.pt and state/ every N steps",
    max_steps_this_run="stop (saving) after N steps of this invocation (0: run to --steps); resume later",
    samples="after training, write samples for the first N test prompts into RUN/samples (toy)",
    device="cpu or cuda (default: cuda:LOCAL_RANK when available)",
    threads="torch CPU threads per process (0: torch's default)")

PRESETS = {
    # toy: 2 CPU cores, the whole main job (data, codec, T5, LM, samples) in <= 20 min -- see README_train.md
    "toy": dict(run_dir="runs/toy", lm_preset="toy", meta_init=False, segment_seconds=2.0, steps=1500, warmup=100,
                lr=2e-3, global_batch=16, ema_every=1, cfg_prob=0.1, eval_every=500, save_every=250, samples=6,
                threads=1),  # toy ops are too small to split; spinning threads collapse on shared cores
    "audiogen-16khz": dict(run_dir="runs/audiogen-16khz", segment_seconds=10.0, cfg_prob=0.1),  # PAPER.md §3, §5
    "musicgen-32khz": dict(run_dir="runs/musicgen-32khz", segment_seconds=30.0, cfg_prob=0.3, lr=1e-4),
}
# Fields that may change between a run and its resumption: they do not change the loss trajectory.
RESUME_FREE = {"eval_every", "save_every", "max_steps_this_run", "samples", "device", "micro_batch", "cache_tokens",
               "cache_dir", "test_manifest", "skip_bad", "threads"}


def parse_config(argv=None):
    ap = argparse.ArgumentParser(description="Train the LM with representation regularization (PAPER.md §2-§3). "
                                 "Defaults: the paper's (audiogen-16khz); the toy preset's where they differ.")
    for f in fields(TrainConfig):
        toy = PRESETS["toy"].get(f.name, f.default)
        dflt = f"default {f.default!r}" + (f", toy {toy!r}" if toy != f.default else "")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        ap.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{HELP[f.name]} ({dflt})", **kind)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "toy")
    if preset not in PRESETS:
        raise SystemExit(f"train.py: error: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    c = TrainConfig(**{**PRESETS[preset], **given})
    toy = preset == "toy"
    c.manifest = c.manifest or ("data/toy/train.jsonl" if toy else "")
    c.valid_manifest = c.valid_manifest or ("data/toy/valid.jsonl" if toy and c.manifest.startswith("data/toy/") else "")
    c.test_manifest = c.test_manifest or ("data/toy/test.jsonl" if toy and c.manifest.startswith("data/toy/") else "")
    c.codec = c.codec or (os.path.join(c.run_dir, "codec", "codec.pt") if toy else "")
    c.t5 = c.t5 or (os.path.join(c.run_dir, "t5") if toy else "")
    problems = [f"--{k.replace('_', '-')} is required for preset {preset!r}" for k in ("manifest", "codec", "t5")
                if not getattr(c, k)]
    if c.rr_pool not in ("max", "mean"):
        problems.append(f"--rr-pool must be 'max' or 'mean', got {c.rr_pool!r}")
    if not 0 <= c.cfg_prob <= 1 or c.rr_weight < 0:
        problems.append(f"need 0 <= --cfg-prob <= 1 and --rr-weight >= 0, got {c.cfg_prob}, {c.rr_weight}")
    if min(c.steps, c.global_batch, c.ema_every, c.eval_every, c.save_every) < 1 or min(c.warmup, c.micro_batch) < 0 \
            or c.segment_seconds <= 0:
        problems.append("need --steps, --global-batch, --ema-every, --eval-every, --save-every >= 1, --warmup, "
                        "--micro-batch >= 0 and --segment-seconds > 0")
    if problems:
        raise SystemExit("train.py: error: " + "; ".join(problems))
    return c


# ----------------------------------------------------------------------------------------------- distributed
def init_distributed(c):
    """Process group: gloo on CPU, nccl on CUDA; torchrun's env if present, else a world of one (no launcher)."""
    cuda = torch.cuda.is_available() and not c.device.startswith("cpu")
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(c.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


class GatherRows(torch.autograd.Function):
    """all-gather (b, D) rows of every rank -> (W*b, D) in rank order. Backward: every rank computed the same global
    loss, so the gradient of a rank's rows is the SUM over ranks of what each computed (an all-reduce)."""

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


def all_reduce(x, op=dist.ReduceOp.SUM):
    dist.all_reduce(x, op=op)
    return x


# ----------------------------------------------------------------------------------------------- data
def rng(*key):
    """numpy generator seeded by a tuple: the data order, crops and CFG draws are functions of (seed, step)."""
    return np.random.default_rng([int(k) for k in key])


PERM, CFG = 2**32 - 1, 2**32 - 2  # third seed words of the permutation / CFG streams (crops use the item index)


@functools.lru_cache(maxsize=4)
def permutation(seed, epoch, n):
    return rng(seed, epoch, PERM).permutation(n)


def global_pairs(step, c, n):
    """(epoch, item) pairs of the step's global batch: one seeded permutation per epoch, so the data position of a
    resumed run is just the step."""
    return [(s // n, int(permutation(c.seed, s // n, n)[s % n]))
            for s in range(step * c.global_batch, (step + 1) * c.global_batch)]


def cfg_dropped(c, step):
    """One CFG decision per step for the whole global batch (PAPER.md §5), the same on every rank."""
    return bool(rng(c.seed, step, CFG).random() < c.cfg_prob)


class TokenSource:
    """Cached codec tokens of a manifest: full-clip codes (K, sum T_i) int16 + offsets; crops in token space."""

    def __init__(self, path, seg_frames, random_crop, seed):
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.codes, self.offsets, self.texts = d["codes"], d["offsets"].tolist(), d["texts"]
        self.seg, self.random_crop, self.seed = seg_frames, random_crop, seed

    def __len__(self):
        return len(self.texts)

    def batch(self, pairs, device):  # -> codes (B, K, T) int64, frame mask (B, T) bool, texts
        K, T = self.codes.shape[0], self.seg
        codes, mask = torch.zeros(len(pairs), K, T, dtype=torch.long), torch.zeros(len(pairs), T, dtype=torch.bool)
        for b, (epoch, i) in enumerate(pairs):
            a, n = self.offsets[i], self.offsets[i + 1] - self.offsets[i]
            start = int(rng(self.seed, epoch, i).integers(n - T + 1)) if self.random_crop and n > T else 0
            m = min(T, n - start)
            codes[b, :, :m], mask[b, :m] = self.codes[:, a + start:a + start + m].long(), True
        return codes.to(device), mask.to(device), [self.texts[i] for _, i in pairs]


class AudioSource:
    """--no-cache-tokens: crops of the audio (data.AudioTextDataset) encoded by the frozen codec at every step."""

    def __init__(self, manifest, codec, c, random_crop):
        self.ds = data.AudioTextDataset(manifest, codec.sample_rate, c.segment_seconds, c.skip_bad, random_crop, c.seed)
        self.texts, self.codec = [it["text"] for it in self.ds.items], codec

    def __len__(self):
        return len(self.texts)

    @torch.no_grad()
    def batch(self, pairs, device):
        items = []
        for epoch, i in pairs:
            self.ds.set_epoch(epoch)
            items.append(self.ds[i])
        b = data.collate(items)
        codes = self.codec.encode(b["wav"].to(device))  # (B, K, T)
        mask = b["mask"][:, ::self.codec.hop_length][:, :codes.shape[-1]].to(device)  # frame real iff its 1st sample is
        return codes, mask, b["text"]


def fail_together(err):
    """Raise SystemExit on EVERY rank if any rank hit an error (a rank raising alone would leave the others waiting)."""
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    first = next((e for e in errs if e), None)
    if first:
        raise SystemExit(f"train.py: error: {first}")


def cache_tokens(manifest, codec, c, rank, world, device):
    """Encode every item of the manifest once, whole (ranks share the work) -> path of the cache file. Reused while
    the manifest and the codec file are unchanged."""
    items, _ = data.read_manifest(manifest, skip_bad=c.skip_bad)
    stat = lambda p: [os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)]
    meta = dict(manifest=stat(manifest), codec=stat(c.codec), n_items=len(items))
    key = hashlib.sha1(f"{meta['manifest'][0]}|{meta['codec'][0]}".encode()).hexdigest()[:10]
    path = os.path.join(c.cache_dir or os.path.join(c.run_dir, "tokens"), f"{os.path.basename(manifest).split('.')[0]}-{key}.pt")
    if os.path.exists(path) and torch.load(path, weights_only=True, mmap=True)["meta"] == meta:
        return path
    index, codes, err = [], [], None
    for i in tqdm(range(rank, len(items), world), desc=f"cache tokens {os.path.basename(manifest)}", disable=rank != 0):
        it = items[i]
        try:
            wav = data.load_audio(it["path"], codec.sample_rate, it["offset"], it["duration"])  # (1, N)
        except Exception as e:
            if not c.skip_bad:
                err = f"{manifest} line {it['line']}: cannot decode {it['path']}: {e}"
                break
            continue
        with torch.no_grad():
            x = codec.encode(wav[None].to(device))[0]  # (K, T) of the whole item
        index.append(i)
        codes.append(x.to(torch.int16 if codec.cardinality < 2**15 else torch.int32).cpu())
    fail_together(err)
    if not all_reduce(torch.tensor(sum(x.shape[-1] > 0 for x in codes), device=device)).item():
        raise SystemExit(f"train.py: error: {manifest}: no usable items")
    data.atomic_save(dict(index=index, codes=codes), f"{path}.rank{rank}")
    dist.barrier()
    if rank == 0:  # merge the ranks' parts, in manifest order
        got = {}
        for r in range(world):
            part = torch.load(f"{path}.rank{r}", weights_only=True)
            got.update((i, x) for i, x in zip(part["index"], part["codes"]) if x.shape[-1] > 0)
        keep = sorted(got)
        data.atomic_save(dict(codes=torch.cat([got[i] for i in keep], dim=1), meta=meta,
                              offsets=torch.tensor([0] + list(np.cumsum([got[i].shape[-1] for i in keep]))),
                              texts=[items[i]["text"] for i in keep]), path)
        for r in range(world):
            os.remove(f"{path}.rank{r}")
    dist.barrier()
    return path


def make_source(manifest, codec, c, seg, random_crop, rank, world, device):
    try:
        if c.cache_tokens:
            return TokenSource(cache_tokens(manifest, codec, c, rank, world, device), seg, random_crop, c.seed)
        return AudioSource(manifest, codec, c, random_crop)
    except data.ManifestError as e:
        raise SystemExit(f"train.py: error: {e}")


def encode_text(t5, texts, length=None):
    """T5 output (B, L, Dt) + mask (B, L), zero-padded to L = `length` tokens, or with length None to the longest
    caption of the GLOBAL batch: zero text positions still take softmax mass in cross-attention (PAPER.md §5), so all
    samples of a step are padded alike and nothing depends on how the batch is split over ranks / micro-batches."""
    with torch.no_grad():
        emb, mask = t5.encode(list(texts))
    if length is None:
        length = int(all_reduce(torch.tensor(emb.shape[1], device=emb.device), dist.ReduceOp.MAX))
    pad = length - emb.shape[1]
    return F.pad(emb, (0, 0, 0, pad)), F.pad(mask, (0, pad))


# ----------------------------------------------------------------------------------------------- model
def build_lm(c, codec, t5, seg_frames, rank, device):
    """AudioLM sharded with FSDP2 (per transformer block, then the root; a plain module in a world of one); the codec
    and T5 stay outside."""
    full = None
    if c.init_musicgen:  # fine-tuning: rank 0 reads the released weights, the shards are broadcast
        err = None
        if rank == 0:
            try:
                full = LM.load_musicgen(c.init_musicgen)
            except (OSError, ValueError) as e:
                err = str(e)
        fail_together(err)
        box = [full.cfg if rank == 0 else None]
        dist.broadcast_object_list(box)
        cfg = box[0]
    else:
        base = LM.LM_PRESETS.get(c.lm_preset, {}).get("max_frames", LM.LMConfig.max_frames)
        try:
            cfg = LM.lm_config(c.lm_preset, num_codebooks=codec.num_codebooks, card=codec.cardinality, text_dim=t5.dim,
                               dim=c.lm_dim or None, num_layers=c.lm_layers or None, num_heads=c.lm_heads or None,
                               max_frames=max(base, seg_frames))
        except ValueError as e:
            raise SystemExit(f"train.py: error: {e}")
        if not c.meta_init and rank == 0:
            torch.manual_seed(c.seed)
            full = LM.AudioLM(cfg)
    try:
        sample.check_compatible(codec, t5, cfg, c.init_musicgen or "LM config")
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")
    if seg_frames > cfg.max_frames:
        raise SystemExit(f"train.py: error: --segment-seconds {c.segment_seconds} is {seg_frames} frames; the LM "
                         f"has positions for {cfg.max_frames}")
    with torch.device("meta"):
        model = LM.AudioLM(cfg)
    if dist.get_world_size() > 1:  # a world of one skips FSDP2: its unshard / reduce copies would only cost time
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
              else MixedPrecisionPolicy())  # PAPER.md §3: bf16 compute, fp32 gradient reduction
        for block in model.transformer.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    if c.init_musicgen or not c.meta_init:
        set_model_state_dict(model, full.state_dict() if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        torch.manual_seed(c.seed)
        model.reset_parameters()  # in place on the shards: no rank ever holds the full model
    with torch.no_grad():
        model.pos_emb.copy_(LM.sin_embedding(*model.pos_emb.shape))  # a non-persistent buffer, lost by to_empty
    return model


def lm_forward(model, codes, text, text_mask, drop_text, frame_mask):
    """lm.lm_loss: Eq. 1 (drop_text False) / Eq. 2 (True) as per-codebook SUMS and counts, which the caller
    averages over the global batch, plus the hidden states the RR loss pools (PAPER.md §2). bf16 compute on
    CUDA (PAPER.md §3): FSDP2's MixedPrecisionPolicy when sharded, autocast in a world of one."""
    with torch.autocast("cuda", torch.bfloat16, enabled=codes.is_cuda and not isinstance(model, FSDPModule)):
        return LM.lm_loss(model, codes, text, text_mask, drop_text, frame_mask)


def lr_at(step, c):
    """Linear warm-up, then cosine decay to 0 at --steps (PAPER.md §3)."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))))


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
    """codec / T5 reference in lm.pt: relative to the run dir when inside it (SPEC.md), else absolute."""
    p, r = os.path.abspath(path), os.path.abspath(run_dir)
    return os.path.relpath(p, r) if p.startswith(r + os.sep) else p


def save_checkpoint(model, opt, ema, step, c, world):
    """lm.pt (rank 0, atomic) and the resumable DCP state (written to state.tmp/, then renamed to state/)."""
    rank = dist.get_rank()
    sd, ema_sd = full_state(model, ema)
    if rank == 0:
        data.atomic_save(dict(lm_config=asdict(model.cfg), lm=sd, lm_ema=ema_sd, train_config=asdict(c), step=step,
                              codec=run_relative(c.codec, c.run_dir), t5=run_relative(c.t5, c.run_dir)),
                         os.path.join(c.run_dir, "lm.pt"))
    final = os.path.join(c.run_dir, "state")
    tmp, old = final + ".tmp", final + ".old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(dict(model=get_model_state_dict(model), optim=get_optimizer_state_dict(model, opt), ema=ema,
                  rng=torch.get_rng_state()), checkpoint_id=tmp)
    dist.barrier()
    if rank == 0:
        data.atomic_write_text(os.path.join(tmp, "train_state.json"), json.dumps(
            dict(step=step, samples_seen=step * c.global_batch, world_size=world, train_config=asdict(c)), indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(model, opt, ema, c):
    """-> the step to continue from (0 when there is no state). A different config is an error naming the fields."""
    final = os.path.join(c.run_dir, "state")
    path = final if os.path.exists(final) else final + ".old"  # .old: a crash between the two renames
    if not os.path.exists(os.path.join(path, "train_state.json")):
        return 0
    with open(os.path.join(path, "train_state.json")) as f:
        meta = json.load(f)
    saved, now = meta["train_config"], asdict(c)
    diff = [f"{k} (saved {saved.get(k)!r}, now {now[k]!r})" for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        raise SystemExit(f"train.py: error: cannot resume {path}: the config differs in {', '.join(diff)}. "
                         f"Use the saved values, another --run-dir, or delete {path} to start over.")
    sd = dict(model=get_model_state_dict(model), optim=get_optimizer_state_dict(model, opt), ema=ema,
              rng=torch.get_rng_state())
    dcp.load(sd, checkpoint_id=path)  # in place: the EMA shards are filled directly
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    torch.set_rng_state(sd["rng"])
    return int(meta["step"])


# ----------------------------------------------------------------------------------------------- steps
def train_step(model, t5, src, step, c, M, device):
    """One optimisation step's forward/backward on this rank -> dict of global (all-reduced) values."""
    rank, W = dist.get_rank(), dist.get_world_size()
    b = c.global_batch // W
    drop = cfg_dropped(c, step)
    rr_on = drop and c.rr_weight > 0
    codes, fmask, texts = src.batch(global_pairs(step, c, len(src))[rank * b:(rank + 1) * b], device)  # (b, K, T)
    K, T = codes.shape[1:]
    text, tmask = encode_text(t5, texts)  # encoded on CFG steps too: RR needs T_b
    # global token counts per codebook: every CE term is divided by them, whatever the ranks / accumulation
    N = all_reduce((LM.delay_valid_mask(K, T, device)[None] & fmask[:, None]).sum((0, 2)).float())
    micro = [slice(i, i + M) for i in range(0, b, M)]
    if rr_on:
        t_all = GatherRows.apply(pool_time(text, tmask, c.rr_pool))  # (G, Dt): T_b of the global batch
        if len(micro) > 1:  # accumulation: every micro-batch needs the pooled audio of the others (no grad)
            with torch.no_grad():
                a_rest = torch.cat([pool_time(o["hidden"], o["hidden_mask"], c.rr_pool).float() for o in
                                    (lm_forward(model, codes[s], text[s], tmask[s], True, fmask[s]) for s in micro)])
    ce_sum, rr = torch.zeros(K, device=device), None
    for s in micro:
        out = lm_forward(model, codes[s], text[s], tmask[s], drop, fmask[s])
        # FSDP averages gradients over ranks: a rank's share of a global mean is scaled by W
        loss = W * (out["ce_sum"] / N.clamp(min=1)).mean()  # per-codebook means, averaged (PAPER.md §5)
        if rr_on:
            a = pool_time(out["hidden"], out["hidden_mask"], c.rr_pool).float()  # (M, D): A_b of this micro-batch
            if len(micro) > 1:  # only this micro-batch's rows carry gradient; summed over micro-batches = exact
                a = torch.cat([a_rest[:s.start], a, a_rest[s.stop:]])
            rr = rr_from_pooled(t_all, GatherRows.apply(a))  # Eq. 3-5 over the global batch
            loss = loss + c.rr_weight * rr  # Eq. 6; all-gather's backward sums the ranks' shares
        loss.backward()
        ce_sum += out["ce_sum"].detach()
    stats = all_reduce(torch.cat([ce_sum, torch.tensor([float(drop), float(STOP["flag"])], device=device)]))
    ce = (stats[:K] / N.clamp(min=1)).mean().item()
    rr = rr.item() if rr is not None else None
    return dict(loss=ce + c.rr_weight * (rr or 0.0), ce=ce, rr=rr, cfg=drop, cfg_ranks=int(stats[K].item()),
                stop=bool(stats[K + 1].item()), tokens=c.global_batch * K * T)


@torch.no_grad()
def validate(model, t5, src, c, M, device, length):
    """Conditional CE of the validation set (first segments), split over ALL ranks (FSDP needs every rank)."""
    rank, W = dist.get_rank(), dist.get_world_size()
    n = len(src)
    per = math.ceil(n / (W * M)) * M  # items per rank, padded with weight-0 repeats
    idx = list(range(rank * per, (rank + 1) * per))
    sums, counts = 0, 0
    for i in range(0, per, M):
        chunk = idx[i:i + M]
        codes, fmask, texts = src.batch([(0, j % n) for j in chunk], device)
        fmask = fmask & torch.tensor([j < n for j in chunk], device=device)[:, None]
        text, tmask = encode_text(t5, texts, length)
        out = lm_forward(model, codes, text, tmask, False, fmask)
        sums, counts = sums + out["ce_sum"], counts + out["count"]
    stats = all_reduce(torch.stack([sums, counts.float()]))
    return (stats[0] / stats[1].clamp(min=1)).mean().item()


STOP = {"flag": False}


def _on_sigterm(signum, frame):  # checked after every step (all ranks agree via an all-reduce), then save + exit
    STOP["flag"] = True


# ----------------------------------------------------------------------------------------------- main
def prepare_toy(c, rank):
    """Toy main job: the toy set, codec and T5 are made on first use (rank 0 makes them, the others wait)."""
    if rank == 0:
        if c.manifest.startswith("data/toy/"):
            data.ensure_toy_dataset("data/toy")
        out = os.path.dirname(c.codec)
        if c.codec == os.path.join(c.run_dir, "codec", "codec.pt"):  # ours to make: train, or finish an interrupted one
            ck = torch.load(c.codec, map_location="cpu", weights_only=True) if os.path.exists(c.codec) else {}
            run = ck.get("run") or {}
            if not ck or ck.get("step", 0) < run.get("steps", 0):
                print(f"toy codec -> {out} (codec.train_codec)")
                codec_lib.train_codec(c.manifest, out, valid=c.valid_manifest or None, preset="toy",
                                      steps=run.get("steps"), resume=True)
        if not os.path.exists(os.path.join(c.t5, "model.safetensors")):  # written last by make_toy_t5
            items, _ = data.read_manifest(c.manifest, skip_bad=c.skip_bad)
            text_encoder.make_toy_t5(c.t5, [it["text"] for it in items], seed=c.seed)
    dist.barrier()


def train(c):
    rank, W, device = init_distributed(c)
    try:
        M = c.micro_batch or c.global_batch // W
        if c.global_batch % (W * M):
            raise SystemExit(f"train.py: error: --global-batch {c.global_batch} is not divisible by world size {W} x "
                             f"--micro-batch {M}")
        if c.threads:  # before the toy codec trains too
            torch.set_num_threads(c.threads)
        if c.preset == "toy":
            prepare_toy(c, rank)
        try:
            codec = codec_lib.load_codec(c.codec, device=device)
            t5 = text_encoder.load_t5(c.t5, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: error: {e}")
        seg = math.ceil(round(c.segment_seconds * codec.sample_rate) / codec.hop_length)  # frames per crop
        if seg < codec.num_codebooks:
            raise SystemExit(f"train.py: error: --segment-seconds {c.segment_seconds} gives {seg} frames; the delay "
                             f"pattern needs >= {codec.num_codebooks}")
        src = make_source(c.manifest, codec, c, seg, c.random_crop, rank, W, device)
        val = make_source(c.valid_manifest, codec, c, seg, False, rank, W, device) if c.valid_manifest else None
        model = build_lm(c, codec, t5, seg, rank, device)
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay,
                                fused=True)  # decay on every weight, as audiocraft; fused: one kernel per step
        ema = {k: p.detach().clone() for k, p in model.named_parameters()}  # sharded like the params
        step = load_checkpoint(model, opt, ema, c)
        done = run(model, opt, ema, t5, src, val, step, c, M, W, device)
    finally:
        dist.destroy_process_group()
    if rank == 0 and done and c.samples and c.test_manifest:
        prompts = list(dict.fromkeys(it["text"] for it in data.read_manifest(c.test_manifest, skip_bad=True)[0]))
        sample.main(["--ckpt", c.run_dir, "--seed", str(c.seed), "--device", str(device), *prompts[:c.samples]])


def run(model, opt, ema, t5, src, val, step, c, M, W, device):
    rank = dist.get_rank()
    os.makedirs(c.run_dir, exist_ok=True)
    mpath = os.path.join(c.run_dir, "metrics.jsonl")
    if rank == 0:  # a resumed run rewrites the steps after its checkpoint
        old = open(mpath).read().splitlines() if os.path.exists(mpath) else []
        data.atomic_write_text(mpath, "".join(l + "\n" for l in old if json.loads(l)["step"] <= step))
    metrics = open(mpath, "a") if rank == 0 else None
    val_len = t5.tokenizer(val.texts)[0].shape[1] if val else 0  # pad to the longest validation caption
    params = list(model.parameters())
    STOP["flag"] = False
    prev = signal.signal(signal.SIGTERM, _on_sigterm)
    start, last_saved = step, step
    bar = tqdm(total=c.steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="train")
    try:
        while step < c.steps:
            t0 = time.time()
            lr = lr_at(step, c)
            for g in opt.param_groups:
                g["lr"] = lr
            r = train_step(model, t5, src, step, c, M, device)
            if r["cfg_ranks"] not in (0, W):
                raise RuntimeError(f"step {step}: ranks disagree on the CFG draw ({r['cfg_ranks']} of {W} dropped)")
            if not math.isfinite(r["loss"]):
                raise SystemExit(f"train.py: error: non-finite loss {r['loss']} at step {step + 1}; stopped, the last "
                                 f"good checkpoint (step {last_saved}) in {c.run_dir} is kept")
            gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            gnorm = gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % c.ema_every == 0:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params], 1 - c.ema_decay)
            dt = time.time() - t0
            rec = dict(step=step, loss=r["loss"], ce=r["ce"], rr=r["rr"], cfg=r["cfg"], cfg_ranks=r["cfg_ranks"],
                       lr=lr, grad_norm=gnorm.item(), tok_s=r["tokens"] / dt)
            if val and (step % c.eval_every == 0 or step == c.steps):
                rec["val_ce"] = validate(model, t5, val, c, M, device, val_len)
                if rank == 0:
                    tqdm.write(f"step {step}: val_ce {rec['val_ce']:.4f}")
            if rank == 0:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{r['loss']:.3f}", ce=f"{r['ce']:.3f}", rr="-" if r["rr"] is None else
                                f"{r['rr']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_s']:.0f}")
            stop = r["stop"] or (c.max_steps_this_run and step - start >= c.max_steps_this_run)
            if step % c.save_every == 0 or step == c.steps or stop:
                save_checkpoint(model, opt, ema, step, c, W)
                last_saved = step
            if stop:
                if rank == 0:
                    tqdm.write(f"stopped at step {step} ({'SIGTERM' if r['stop'] else '--max-steps-this-run'}); "
                               f"state saved in {c.run_dir}/state, run the same command to resume")
                break
        return step >= c.steps
    finally:
        signal.signal(signal.SIGTERM, prev)
        bar.close()
        if metrics:
            metrics.close()


def main(argv=None):
    c = parse_config(argv)
    train(c)


if __name__ == "__main__":
    main()
