"""The delay-pattern transformer LM of MusicGen / AudioGen and its fast CFG sampler (PAPER.md §3.1;
PAPER.md "audiocraft: LM layers and init").

Same function as audiocraft's `LMModel` (module names mirror its state-dict keys, so released
`state_dict.bin` files load with `load_musicgen`), plus:
  - `lm_loss`: per-codebook cross-entropy (Eq. 1/2) and the hidden states the RR loss pools (PAPER.md §3.2);
  - `generate`: KV-cached sampling with classifier-free guidance as one doubled batch.
Shapes: B batch, K codebooks, T frames, S pattern steps, D width, H heads, Tt text tokens.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data

try:  # optional: memory-efficient attention on CUDA, as audiocraft trains with (PAPER.md §4.2)
    import xformers.ops as xops
except ImportError:
    xops = None


@dataclass
class LMConfig:
    dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    num_codebooks: int = 4
    card: int = 2048          # codebook size; token `card` is the special (empty) token
    text_dim: int = 768       # T5 width (t5-base); projected to `dim` inside the LM
    hidden_scale: int = 4     # FFN width = hidden_scale * dim
    max_frames: int = 1500    # longest sequence in frames (30 s at 50 Hz)


# toy: card / text_dim are filled from the toy codec and toy T5 (lm_config("toy", card=..., text_dim=...)).
LM_PRESETS = {
    "toy": dict(dim=128, num_layers=4, num_heads=4, num_codebooks=4, card=None, text_dim=None),
    "small": dict(dim=1024, num_layers=24, num_heads=16, num_codebooks=4, card=2048, text_dim=768),   # 300M
    "medium": dict(dim=1536, num_layers=48, num_heads=24, num_codebooks=4, card=2048, text_dim=768),  # 1.5B
}


def lm_config(preset, **overrides):
    """LMConfig of a preset name (or a dict, e.g. a checkpoint's lm_config) with overrides applied."""
    if isinstance(preset, str):
        if preset not in LM_PRESETS:
            raise ValueError(f"unknown LM preset {preset!r}; expected one of {sorted(LM_PRESETS)}")
        preset = LM_PRESETS[preset]
    kw = {**preset, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(kw) - set(LMConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown LMConfig field(s) {unknown}")
    missing = [k for k, v in kw.items() if v is None]
    if missing:
        raise ValueError(f"LMConfig field(s) {missing} must be given (take them from the codec / text encoder)")
    cfg = LMConfig(**kw)
    if cfg.dim % cfg.num_heads or cfg.dim % 2:
        raise ValueError(f"dim {cfg.dim} must be even and split into {cfg.num_heads} heads")
    return cfg


# ---------------------------------------------------------------- delay pattern
# PAPER.md "audiocraft: delay pattern".
# Step 0 holds only the special token; step s holds frame s-1-k of codebook k when 0 <= s-1-k < T.
# The model's output at step s predicts step s+1, i.e. frame s-k of codebook k.

def build_delay_pattern(codes, special, full=False):
    """(B, K, T) -> (B, K, S). full=False: S = T+1, audiocraft's training layout (keep_only_valid_steps):
    codebook k loses its last k frames. full=True: S = T+K, every frame present (generation layout)."""
    B, K, T = codes.shape
    S = T + K if full else T + 1
    frame = torch.arange(S, device=codes.device) - 1 - torch.arange(K, device=codes.device)[:, None]  # (K, S)
    valid = (frame >= 0) & (frame < T)
    seq = codes.gather(2, frame.clamp(0, T - 1).expand(B, K, S))
    return torch.where(valid, seq, torch.full_like(seq, special))


def revert_delay_pattern(seq, num_frames=None, fill=None, logits=False):
    """(B, K, S, *) -> (B, K, T, *): frame t of codebook k sits at step t+1+k of a token sequence; its
    logits come from step t+k (logits=True). Frames outside the sequence get `fill` (special / nan)."""
    B, K, S = seq.shape[:3]
    shift = 0 if logits else 1
    T = num_frames if num_frames is not None else S - K  # default: the full layout (S = T+K)
    step = torch.arange(T, device=seq.device) + torch.arange(K, device=seq.device)[:, None] + shift  # (K, T)
    out = seq[:, torch.arange(K, device=seq.device)[:, None], step.clamp(max=S - 1)]
    if fill is not None:  # the token of frame t must exist (step t+1+k < S); the last step's logits predict nothing
        inside = (step + 1 - shift < S).view(1, K, T, *([1] * (seq.dim() - 3)))
        out = torch.where(inside, out, torch.full_like(out, fill))
    return out


def delay_valid_mask(K, T, device=None):
    """(K, T) bool: frames predicted in training (audiocraft's revert_pattern_logits mask: t < T - k)."""
    return torch.arange(T, device=device) < (T - torch.arange(K, device=device))[:, None]


# ---------------------------------------------------------------- model

def attend(q, k, v, causal=False):
    """q (B, Sq, H, hd), k/v (B, Sk, H, hd) -> (B, Sq, H, hd)."""
    if xops is not None and q.is_cuda:
        return xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask() if causal else None)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with fused q/k/v weight `in_proj_weight` (3D, D) and no biases
    (PAPER.md "audiocraft: LM layers and init")."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, ctx=None):  # x (B, S, D); ctx (B, Tt, D) for cross-attention, else causal self-attention
        B, S, D = x.shape
        H, hd = self.num_heads, D // self.num_heads
        if ctx is None:
            q, k, v = F.linear(x, self.in_proj_weight).view(B, S, 3, H, hd).unbind(2)
        else:
            q = F.linear(x, self.in_proj_weight[:D]).view(B, S, H, hd)
            k, v = F.linear(ctx, self.in_proj_weight[D:]).view(B, ctx.shape[1], 2, H, hd).unbind(2)
        return self.out_proj(attend(q, k, v, causal=ctx is None).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm layer: x += SelfAttn(norm1 x); x += CrossAttn(norm_cross x, text); x += FFN(norm2 x)."""

    def __init__(self, cfg):
        super().__init__()
        self.checkpointing = False  # checkpoint_blocks: recompute this block in the backward pass
        D = cfg.dim
        self.self_attn, self.cross_attention = Attention(D, cfg.num_heads), Attention(D, cfg.num_heads)
        self.norm1, self.norm_cross, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)  # eps 1e-5
        self.linear1 = nn.Linear(D, cfg.hidden_scale * D, bias=False)
        self.linear2 = nn.Linear(cfg.hidden_scale * D, D, bias=False)

    def forward(self, x, ctx=None):  # x (B, S, D), ctx (B, Tt, D) or None
        if self.checkpointing and torch.is_grad_enabled():  # keep only x and ctx; the rest is recomputed
            return checkpoint(self.layer, x, ctx, use_reentrant=False)
        return self.layer(x, ctx)

    def layer(self, x, ctx):
        x = x + self.self_attn(self.norm1(x))
        if ctx is not None:  # dropped text: zero keys/values would add exactly zero, so skip
            # (PAPER.md "audiocraft: cross-attention and padding")
            x = x + self.cross_attention(self.norm_cross(x), ctx)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


def checkpoint_blocks(model, on=True):
    """Activation checkpointing: each transformer block keeps only its input in the forward pass and recomputes
    the rest in the backward pass (about one more forward of compute for activations of one block instead of all).
    Set inside Block.forward, so under FSDP2 the recompute runs while fully_shard has the block's weights
    gathered; call it before or after fully_shard."""
    for block in model.transformer.layers:
        block.checkpointing = on
    return model


def sin_embedding(num_positions, dim, max_period=10000.0):
    """(P, D) cat[cos, sin] positions, audiocraft's create_sin_embedding (frequencies max_period^(-i/(D/2-1)))."""
    half = dim // 2
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    phase = pos / (torch.tensor(max_period) ** (torch.arange(half, dtype=torch.float32) / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class AudioLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        D, K = cfg.dim, cfg.num_codebooks
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, D) for _ in range(K)])  # +1: special token
        self.transformer = nn.ModuleDict({"layers": nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])})
        self.out_norm = nn.LayerNorm(D)
        self.linears = nn.ModuleList([nn.Linear(D, cfg.card, bias=False) for _ in range(K)])
        # T5 -> LM width, with bias (PAPER.md "audiocraft: T5 conditioner")
        self.text_proj = nn.Linear(cfg.text_dim, D)
        # generation needs positions 0 .. max_frames + K - 2; not saved (a function of the config)
        self.register_buffer("pos_emb", sin_embedding(cfg.max_frames + K, D), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """audiocraft's MusicGen init (weight_init gaussian, depthwise_init current):
        PAPER.md "audiocraft: LM layers and init"."""
        def trunc_normal(w, fan_in, depth=None):  # std 1/sqrt(fan_in), / sqrt(2 * depth) inside the layers
            std = fan_in ** -0.5 / (math.sqrt(2 * depth) if depth else 1.0)
            nn.init.trunc_normal_(w, 0.0, std, -3 * std, 3 * std)
        for e in self.emb:
            trunc_normal(e.weight, self.cfg.dim)
        for i, layer in enumerate(self.transformer.layers):
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal(m.weight, m.in_features, depth=i + 1)
                elif isinstance(m, Attention):  # audiocraft keeps in_proj_weight as a bare Parameter that its
                    nn.init.kaiming_uniform_(m.in_proj_weight, a=math.sqrt(5))  # init skips: PyTorch Linear default
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
        self.out_norm.reset_parameters()
        for lin in self.linears:
            trunc_normal(lin.weight, self.cfg.dim)
        self.text_proj.reset_parameters()  # the conditioner's own nn.Linear default init

    def project_text(self, text, text_mask):
        """(B, Tt, Dt) T5 output, (B, Tt) bool -> (B, Tt, D); audiocraft masks AFTER the projection, so
        padded / empty-caption positions are exact zeros (bias included) -- PAPER.md "audiocraft: T5 conditioner"."""
        ctx = self.text_proj(text)
        return ctx if text_mask is None else ctx * text_mask.unsqueeze(-1).to(ctx.dtype)

    def trunk(self, seq, text=None, text_mask=None):
        """seq (B, K, S) tokens -> hidden (B, S, D) after out_norm. text None = CFG-dropped (no cross-attention)."""
        B, K, S = seq.shape
        if K != self.cfg.num_codebooks:
            raise ValueError(f"seq has {K} codebooks, the LM models {self.cfg.num_codebooks}")
        if S > self.pos_emb.shape[0]:
            raise ValueError(f"sequence of {S} steps exceeds the LM's {self.pos_emb.shape[0]} positions")
        x = sum(self.emb[k](seq[:, k]) for k in range(K))  # (B, S, D): codebook embeddings summed
        x = x + self.pos_emb[:S].to(x.dtype)  # positions added once, starting at 0
        ctx = None if text is None else self.project_text(text, text_mask)
        for layer in self.transformer.layers:
            x = layer(x, ctx)
        return self.out_norm(x)

    def forward(self, seq, text=None, text_mask=None):
        """-> logits (B, K, S, card), hidden (B, S, D); logits at step s predict step s+1."""
        h = self.trunk(seq, text, text_mask)
        return torch.stack([lin(h) for lin in self.linears], dim=1), h


# ---------------------------------------------------------------- training loss

def lm_loss(lm, codes, text, text_mask, drop_text=False, frame_mask=None):
    """codes (B, K, T); frame_mask (B, T) bool (False on zero-padded frames) -> dict(loss, per_codebook_ce (K,),
    ce_sum (K,), count (K,), logits, hidden (B, T, D), hidden_mask (B, T), mask (B, K, T)). drop_text: the CFG step
    (Eq. 2), text left out. ce_sum / count are the per-codebook SUMS of token cross-entropies and the token
    counts: they add up across micro-batches and ranks, which lets train.py average over the global batch."""
    B, K, T = codes.shape
    if T < K:
        raise ValueError(f"need at least {K} frames per clip (codebook k loses its last k frames), got {T}")
    card = lm.cfg.card
    fm = torch.ones(B, T, dtype=torch.bool, device=codes.device) if frame_mask is None else frame_mask.bool()
    seq = build_delay_pattern(codes, card)  # (B, K, T+1)
    logits, hidden = lm(seq, None if drop_text else text, None if drop_text else text_mask)
    sums, mask = [], torch.zeros(B, K, T, dtype=torch.bool, device=codes.device)
    for k in range(K):  # frame t of codebook k is predicted at step t+k; valid for t < T-k
        # (PAPER.md "audiocraft: delay pattern")
        n = T - k
        mk = fm[:, :n]
        mask[:, k, :n] = mk
        ce = F.cross_entropy(logits[:, k, k:T].float().reshape(-1, card), codes[:, k, :n].reshape(-1),
                             reduction="none").view(B, n)
        sums.append((ce * mk).sum())
    ce_sum, count = torch.stack(sums), mask.sum((0, 2))
    per_cb = ce_sum / count.clamp(min=1)  # mean over the valid positions of the batch, per codebook
    # Hidden step t is the state that predicts frame t of codebook 0 (and frame t-k of codebook k); it has only
    # seen frames < t, so with a zero-padded clip it is valid exactly where frame t is -- "padding never wins"
    # (PAPER.md §3.2).
    return dict(loss=per_cb.mean(), per_codebook_ce=per_cb.detach(), ce_sum=ce_sum, count=count, logits=logits,
                hidden=hidden[:, :T], hidden_mask=fm, mask=mask)


# ---------------------------------------------------------------- generation

def sample_next(logits, temperature=1.0, top_k=250, top_p=0.0, generator=None):
    """logits (B, K, card) -> tokens (B, K). temperature 0 or top_k 1: greedy; top_p > 0 replaces top-k."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    B, K, C = logits.shape
    if temperature != 1.0:
        logits = logits / temperature
    if top_p > 0:  # smallest set of tokens whose probability reaches top_p (audiocraft's sample_top_p)
        p, idx = logits.softmax(-1).sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)
        j = torch.multinomial(p.view(-1, C), 1, generator=generator)
        return idx.view(-1, C).gather(1, j).view(B, K)
    if 0 < top_k < C:
        v, idx = logits.topk(top_k, dim=-1)
        j = torch.multinomial(v.softmax(-1).view(-1, top_k), 1, generator=generator)
        return idx.view(-1, top_k).gather(1, j).view(B, K)
    return torch.multinomial(logits.softmax(-1).view(-1, C), 1, generator=generator).view(B, K)


def few_rows_linear(x, w):
    """x (N, in) @ w (out, in)^T for the handful of rows of a decoding step, computed as (w @ x^T)^T: BLAS then
    streams the weight once as a matrix-vector product, near memory bandwidth. F.linear's orientation ran ~4x
    slower for 2 rows on our 2-core CPU (151 MB of weights: 18.5 ms vs 4.1 ms). Same products, summed in another
    order: equal to F.linear up to float rounding."""
    return (w @ x.T).T.contiguous()


def _cached_stepper(lm, ctx, B, N, S):
    """Returns step(s, tokens (B, K)) -> hidden (N, D) with a preallocated self-attention KV cache and the
    text keys/values computed once. Rows [:B] are conditional, [B:N] the null condition (no cross-attention:
    its zero text would add exactly zero, PAPER.md "audiocraft: cross-attention and padding"). Weights are read
    once here to keep the loop lean."""
    cfg, p = lm.cfg, next(lm.parameters())
    D, H = cfg.dim, cfg.num_heads
    hd = D // H
    embs = [e.weight for e in lm.emb]  # K tables (card+1, D), looked up in place: no copy of the weights
    pos = lm.pos_emb.to(p.dtype)
    layers = []
    for L in lm.transformer.layers:
        kv = torch.empty(2, N, H, S, hd, device=p.device, dtype=p.dtype)  # self-attention cache
        ck = cv = None
        if ctx is not None:
            ck, cv = F.linear(ctx, L.cross_attention.in_proj_weight[D:]).view(B, -1, 2, H, hd).permute(2, 0, 3, 1, 4)
        layers.append((L.norm1.weight, L.norm1.bias, L.self_attn.in_proj_weight, L.self_attn.out_proj.weight, kv,
                       L.norm_cross.weight, L.norm_cross.bias, L.cross_attention.in_proj_weight[:D], ck, cv,
                       L.cross_attention.out_proj.weight, L.norm2.weight, L.norm2.bias,
                       L.linear1.weight, L.linear2.weight))
    onw, onb = lm.out_norm.weight, lm.out_norm.bias

    def step(s, tokens):
        x = pos[s] + sum(F.embedding(tokens[:, k], w) for k, w in enumerate(embs))  # (B, D)
        if N > B:
            x = torch.cat([x, x])  # (N, D): both halves see the same audio prefix
        for n1w, n1b, w_qkv, w_o, kv, ncw, ncb, w_q, ck, cv, w_co, n2w, n2b, w1, w2 in layers:
            qkv = few_rows_linear(F.layer_norm(x, (D,), n1w, n1b), w_qkv).view(N, 3, H, 1, hd)
            kv[:, :, :, s:s + 1] = qkv[:, 1:].transpose(0, 1)
            a = F.scaled_dot_product_attention(qkv[:, 0], kv[0, :, :, :s + 1], kv[1, :, :, :s + 1])  # (N, H, 1, hd)
            x = x + few_rows_linear(a.reshape(N, D), w_o)
            if ck is not None:
                q = few_rows_linear(F.layer_norm(x[:B], (D,), ncw, ncb), w_q).view(B, H, 1, hd)
                x[:B] += few_rows_linear(F.scaled_dot_product_attention(q, ck, cv).reshape(B, D), w_co)
            x = x + few_rows_linear(F.gelu(few_rows_linear(F.layer_norm(x, (D,), n2w, n2b), w1)), w2)
        return F.layer_norm(x, (D,), onw, onb)
    return step


@torch.inference_mode()
def generate(lm, text, text_mask, num_frames, cfg_coef=3.0, top_k=250, top_p=0.0, temperature=1.0,
             generator=None, use_cache=True, progress=True, num_samples=1):
    """text (B, Tt, Dt) T5 output + mask (B, Tt) -> codes (B, K, num_frames).
    CFG (PAPER.md "audiocraft: sampling"): logits = uncond + cfg_coef * (cond - uncond), cond and null condition
    run as one doubled batch; cfg_coef=None runs the conditional model alone. text None: unconditional,
    num_samples rows. use_cache=False recomputes the whole prefix at every step (reference path for tests)."""
    cfg = lm.cfg
    K, card, T = cfg.num_codebooks, cfg.card, int(num_frames)
    if not 1 <= T <= cfg.max_frames:
        raise ValueError(f"num_frames must be in 1..{cfg.max_frames} (the LM's positions), got {num_frames}")
    if temperature < 0 or top_k < 0 or not 0 <= top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 <= top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if any(type(p).__name__ == "DTensor" for p in lm.parameters()):
        raise ValueError("generate() needs a plain (non-FSDP) module, e.g. the EMA copy")
    p = next(lm.parameters())
    B = num_samples if text is None else text.shape[0]
    guided = text is not None and cfg_coef is not None
    N = 2 * B if guided else B
    S = T + K  # full layout: step 0 special, frames up to step T+K-1
    if text is not None:
        text = text.to(p.device, p.dtype)
        text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=p.device) if text_mask is None \
            else text_mask.to(p.device)
    valid = build_delay_pattern(torch.zeros(1, K, T, dtype=torch.long, device=p.device), -1, full=True)[0] >= 0
    seq = torch.full((B, K, S), card, dtype=torch.long, device=p.device)  # (B, K, S)
    heads = [lin.weight for lin in lm.linears]  # K (card, D); not concatenated: a copy would add K*card*D memory
    if use_cache:
        step = _cached_stepper(lm, None if text is None else lm.project_text(text, text_mask), B, N, S)
    else:
        txt, msk = text, text_mask
        if guided:  # the null condition: an empty caption, all positions masked (PAPER.md "audiocraft: CFG dropout")
            txt, msk = torch.cat([text, torch.zeros_like(text)]), torch.cat([text_mask, torch.zeros_like(text_mask)])

        def step(s, tokens):
            prefix = seq[:, :, :s + 1]
            return lm.trunk(torch.cat([prefix, prefix]) if guided else prefix, txt, msk)[:, -1]
    for s in tqdm(range(S - 1), desc="generate", unit="step", disable=not progress, leave=False):
        h = step(s, seq[:, :, s])  # (N, D)
        if guided:  # heads are linear without bias, so mixing hidden states = mixing logits, at half the head cost
            h = h[B:] + cfg_coef * (h[:B] - h[B:])
        nxt = sample_next(torch.stack([few_rows_linear(h, w) for w in heads], 1), temperature, top_k, top_p, generator)
        seq[:, :, s + 1] = torch.where(valid[:, s + 1], nxt, card)  # invalid pattern positions: special token
    return revert_delay_pattern(seq)  # (B, K, T)


# ---------------------------------------------------------------- checkpoints

def check_compatible(codec, t5, lm_cfg, source):
    """The LM (its LMConfig) must model the codec's tokens and read the text encoder's width."""
    got = (codec.num_codebooks, codec.cardinality, t5.dim)
    if got != (lm_cfg.num_codebooks, lm_cfg.card, lm_cfg.text_dim):
        raise ValueError(f"{source}: LM expects {lm_cfg.num_codebooks} codebooks x {lm_cfg.card} codes and text "
                         f"width {lm_cfg.text_dim}; codec/T5 give {got[0]} x {got[1]} and {got[2]}")


def load_state_checked(model, sd, source):
    """model.load_state_dict(sd) with a readable mismatch report."""
    data.check_state_dict(model.state_dict(), sd, source, f"the LM config {model.cfg}")
    model.load_state_dict(sd)
    return model


def lm_from_state_dict(cfg, sd, source):
    """AudioLM(cfg) holding `sd`, built without the (slow, overwritten) random init: meta device, then load."""
    with torch.device("meta"):
        model = AudioLM(cfg)
    data.check_state_dict(model.state_dict(), sd, source, f"the LM config {cfg}")
    model = model.to_empty(device="cpu")
    model.load_state_dict(sd)
    model.pos_emb.copy_(sin_embedding(*model.pos_emb.shape))
    return model


MUSICGEN_PROJ = "condition_provider.conditioners.description.output_proj."  # audiocraft's name of text_proj
T5_BY_WIDTH = {512: "t5-small", 768: "t5-base", 1024: "t5-large"}  # the names audiocraft's T5Conditioner takes


def musicgen_xp_cfg(cfg, t5_name=None, cfg_prob=0.3, cfg_coef=3.0):
    """audiocraft's xp.cfg for an LMConfig: the fields its builders.get_lm_model and MusicGen read, with the values
    of its musicgen_lm config (PAPER.md "audiocraft: LM layers and init"; "audiocraft: released checkpoints").
    segment_duration = max_frames / 50: released codecs run at 50 Hz, and load_musicgen reads it back that way."""
    return {
        "lm_model": "transformer_lm", "device": "cpu", "dtype": "float32",
        "transformer_lm": dict(
            dim=cfg.dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, hidden_scale=cfg.hidden_scale,
            n_q=cfg.num_codebooks, card=cfg.card, dropout=0.0, emb_lr=None, activation="gelu", norm_first=True,
            bias_ff=False, bias_attn=False, bias_proj=False, past_context=None, causal=True, custom=False,
            memory_efficient=True, attention_as_float32=False, layer_scale=None, positional_embedding="sin",
            xpos=False, checkpointing="none", weight_init="gaussian", depthwise_init="current", zero_bias_init=True,
            norm="layer_norm", cross_attention=False, qk_layer_norm=False, qk_layer_norm_cross=False,
            attention_dropout=None, kv_repeat=1, two_step_cfg=False),
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": list(range(cfg.num_codebooks)),
                                                             "flatten_first": 0, "empty_initial": 0}},
        "classifier_free_guidance": {"training_dropout": cfg_prob, "inference_coef": cfg_coef},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
                  "cross": ["description"], "input_interpolate": []},
        "conditioners": {"description": {"model": "t5", "t5": {
            "name": t5_name or T5_BY_WIDTH.get(cfg.text_dim), "finetune": False, "word_dropout": 0.0,
            "normalize_text": False}}},
        "dataset": {"segment_duration": cfg.max_frames / 50},
    }


def save_musicgen(model, path, t5_name=None, cfg_prob=0.3, cfg_coef=3.0):
    """Inverse of load_musicgen: an audiocraft state_dict.bin ({'best_state': audiocraft's LMModel keys, 'xp.cfg':
    YAML, 'exported': True}; written atomically). Our module names are audiocraft's except the text projection,
    which audiocraft keeps in the T5 conditioner (PAPER.md "audiocraft: T5 conditioner")."""
    sd = {(MUSICGEN_PROJ + k[len("text_proj."):] if k.startswith("text_proj.") else k): v.detach().float().cpu()
          for k, v in model.state_dict().items()}
    xp = yaml.safe_dump(musicgen_xp_cfg(model.cfg, t5_name, cfg_prob, cfg_coef), sort_keys=False)
    data.atomic_save({"best_state": sd, "xp.cfg": xp, "exported": True}, path)
    return path


def load_musicgen(path, device="cpu"):
    """AudioLM from a released audiocraft `state_dict.bin` ({'best_state': sd, 'xp.cfg': cfg, ...}; PAPER.md
    "audiocraft: released checkpoints"). Sizes come from the weights, heads from the cfg."""
    pkg = data.torch_load(path, "MusicGen LM checkpoint (audiocraft's state_dict.bin)")
    if not isinstance(pkg, dict) or "best_state" not in pkg:
        raise ValueError(f"{path}: expected a dict with 'best_state' (an audiocraft state_dict.bin)")
    sd = pkg["best_state"]
    sd = sd["model"] if "model" in sd and isinstance(sd["model"], dict) else sd
    xp = data.xp_config(pkg["xp.cfg"], path) if pkg.get("xp.cfg") else {}
    tl = xp.get("transformer_lm") or {}
    pattern = xp.get("codebooks_pattern") or {}
    if pattern.get("modeling", "delay") != "delay":
        raise ValueError(f"{path}: codebooks_pattern.modeling={pattern['modeling']!r}; only 'delay' is supported")
    if tl.get("positional_embedding", "sin") != "sin" or tl.get("norm_first", True) is not True:
        raise ValueError(f"{path}: only pre-norm LMs with sinusoidal positions are supported")
    conds = {k.split(".")[2] for k in sd if k.startswith("condition_provider.conditioners.")} | set(
        xp.get("conditioners") or {}) - {"args"}
    if conds - {"description"}:  # melody: a chroma 'self_wav' conditioner prepended to the input
        models = {c: ((xp.get("conditioners") or {}).get(c) or {}).get("model") for c in sorted(conds - {"description"})}
        raise ValueError(f"{path}: conditioners {models} are not supported (melody / audio conditioning); only "
                         "text-conditioned MusicGen / AudioGen (one T5 'description' conditioner)")
    stereo = (xp.get("interleave_stereo_codebooks") or {}).get("use") or xp.get("channels") == 2
    delays = (pattern.get("delay") or {}).get("delays")
    if stereo or (delays and len(set(delays)) < len(delays)):
        raise ValueError(f"{path}: a stereo checkpoint (interleaved codebooks, delays {delays}) is not supported; "
                         "only mono MusicGen (e.g. musicgen-small)")
    sd = {("text_proj." + k[len(MUSICGEN_PROJ):] if k.startswith(MUSICGEN_PROJ) else k): v for k, v in sd.items()}
    if "emb.0.weight" not in sd or "text_proj.weight" not in sd:
        raise ValueError(f"{path}: no 'emb.0.weight' / '{MUSICGEN_PROJ}weight' -- not a text-conditioned audiocraft LM")
    K = sum(1 for k in sd if k.startswith("emb.") and k.endswith(".weight"))
    card, dim = sd["emb.0.weight"].shape[0] - 1, sd["emb.0.weight"].shape[1]
    num_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers."))
    ffn = sd["transformer.layers.0.linear1.weight"].shape[0]
    delays = delays or list(range(K))
    if list(delays) != list(range(K)):
        raise ValueError(f"{path}: delays {delays} unsupported; only the standard delays 0..K-1")
    seg = (xp.get("dataset") or {}).get("segment_duration")  # released codecs run at 50 Hz (PAPER.md §3.1)
    cfg = lm_config(dict(
        dim=dim, num_layers=num_layers, num_codebooks=K, card=card, text_dim=sd["text_proj.weight"].shape[1],
        num_heads=int(tl.get("num_heads") or dim // 64),  # released MusicGen heads are 64 wide
        hidden_scale=ffn // dim, max_frames=int(round(seg * 50)) if isinstance(seg, (int, float)) else 1500))
    for key in ("dim", "n_q", "card", "num_layers"):
        want = {"dim": dim, "n_q": K, "card": card, "num_layers": num_layers}[key]
        if isinstance(tl.get(key), int) and tl[key] != want:
            raise ValueError(f"{path}: xp.cfg transformer_lm.{key}={tl[key]} but the weights have {want}")
    return lm_from_state_dict(cfg, sd, path).to(device).eval()
