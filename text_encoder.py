"""The frozen T5 text encoder that conditions the LM, in plain torch (PAPER.md §3.1;
PAPER.md "audiocraft: T5 conditioner").

MusicGen uses t5-base (768), AudioGen t5-large (1024). `load_t5(dir)` reads a HF-format directory
(config.json, model.safetensors or pytorch_model.bin, spiece.model) of any T5 v1.0 / v1.1 / flan-T5
and computes what transformers.T5EncoderModel computes (test_all.py checks it); the module keeps
HF's key names, so checkpoints load as they are. `make_toy_t5` writes a small random T5 in the same
format, the toy default when no T5 directory is given.
"""
import argparse
import collections
import io
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import data


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int  # width of one head; num_heads * d_kv need not equal d_model (t5-large: 16 * 64 = 1024)
    d_ff: int
    num_layers: int  # encoder layers
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (v1.1, flan-T5)
    dense_act_fn: str = "relu"
    is_gated_act: bool = False


# The toy default (make_toy_t5): t5-base's architecture (v1.0, ReLU) at a size 2 CPU cores handle.
TOY_T5 = dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4, feed_forward_proj="relu")
TOY_SPM_VOCAB = 256  # soft limit: sentencepiece keeps fewer pieces when the captions hold fewer
T5_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_*> sit after the sentencepiece pieces
REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu}


def config_from_json(path):
    """T5Config of a HF config.json; the activation resolved as transformers' T5Config does."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if raw.get("model_type") != "t5":
        raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, expected 't5' "
                         "(a t5-* / t5-v1_1-* / flan-t5-* directory)")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{path}: not a T5 encoder config, missing field(s) {missing}")
    proj = raw.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"{path}: feed_forward_proj {proj!r}, expected 'ACT' or 'gated-ACT'")
    # "gated-gelu" means the tanh approximation (gelu_new) in T5 v1.1; an explicit dense_act_fn /
    # is_gated_act in the file wins, as in transformers (flan-t5's config.json spells both out).
    act = raw.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])
    if act not in ACTS:
        raise ValueError(f"{path}: activation {act!r} not supported, expected one of {sorted(ACTS)}")
    keys = T5Config.__dataclass_fields__
    kw = {k: v for k, v in raw.items() if k in keys and k not in ("dense_act_fn", "is_gated_act")}
    return T5Config(**kw, dense_act_fn=act, is_gated_act=bool(raw.get("is_gated_act", parts[0] == "gated")))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; the variance taken in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def _holder(**children):
    """An nn.Module that only holds children, so that state-dict keys are exactly HF's."""
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


def relative_position_bucket(rel, num_buckets, max_distance):
    """Bidirectional T5 bucketing of rel = key_pos - query_pos: half of the buckets per direction,
    exact for small distances, log-spaced up to max_distance, everything beyond in the last bucket."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half  # keys after the query use the upper half
    n = rel.abs()
    exact = half // 2
    log_b = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_b.clamp(max=half - 1))


class Block(nn.Module):
    """layer.0: pre-norm self-attention; layer.1: pre-norm feed-forward (HF's T5Block, encoder side)."""

    def __init__(self, cfg, has_relative_bias):
        super().__init__()
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # T5 has no biases anywhere
        attn = _holder(q=lin(d, inner), k=lin(d, inner), v=lin(d, inner), o=lin(inner, d))
        if has_relative_bias:  # only block 0 owns the table; all blocks reuse its bias
            attn.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        ff = (_holder(wi_0=lin(d, cfg.d_ff), wi_1=lin(d, cfg.d_ff), wo=lin(cfg.d_ff, d)) if cfg.is_gated_act
              else _holder(wi=lin(d, cfg.d_ff), wo=lin(cfg.d_ff, d)))
        eps = cfg.layer_norm_epsilon
        self.layer = nn.ModuleList([_holder(SelfAttention=attn, layer_norm=RMSNorm(d, eps)),
                                    _holder(DenseReluDense=ff, layer_norm=RMSNorm(d, eps))])
        self.heads, self.d_kv, self.gated, self.act = cfg.num_heads, cfg.d_kv, cfg.is_gated_act, ACTS[cfg.dense_act_fn]

    def forward(self, x, bias):  # x (B, T, D), bias (B, H, T, T) position bias + key padding
        sa, ff = self.layer
        a, h = sa.SelfAttention, sa.layer_norm(x)
        B, T, _ = x.shape
        q, k, v = (p(h).view(B, T, self.heads, self.d_kv).transpose(1, 2) for p in (a.q, a.k, a.v))  # (B, H, T, dk)
        # No 1/sqrt(d_kv): T5 folds it into the init of q (std (d_model * d_kv)^-0.5) instead.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        x = x + a.o(y.transpose(1, 2).reshape(B, T, self.heads * self.d_kv))
        d, h = ff.DenseReluDense, ff.layer_norm(x)
        h = self.act(d.wi_0(h)) * d.wi_1(h) if self.gated else self.act(d.wi(h))
        return x + d.wo(h)  # dropout omitted: we only run T5 as a frozen encoder (eval)


class T5Tokenizer:
    """sentencepiece with T5's conventions (pad 0, eos 1 appended, unk 2), right-padded batches;
    the same ids as transformers' T5Tokenizer on the same spiece.model (test_all.py checks it).
    Differs only in that strings like '</s>' or '<extra_id_0>' inside a caption are read as text."""
    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self, path, max_length=512):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0][:200]})") from None
        got = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if got != (0, 1, 2):
            raise ValueError(f"{path}: (pad, eos, unk) ids are {got}, expected T5's (0, 1, 2)")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for the eos), got {max_length}")
        self.max_length, self._warned = max_length, False

    def __len__(self):
        return self.sp.get_piece_size()

    def __call__(self, captions):  # -> ids (B, T) int64, mask (B, T) bool
        rows = [self.sp.encode(c) for c in captions]
        long = sum(len(r) + 1 > self.max_length for r in rows)
        if long and not self._warned:  # once per tokenizer: a training loop would repeat it every step
            warnings.warn(f"{long} caption(s) longer than max_length={self.max_length} tokens were truncated "
                          "(warned once)")
            self._warned = True
        # Truncation keeps the eos as the last token, as transformers does.
        rows = [r[: self.max_length - 1] + [self.eos_id] for r in rows]
        ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != self.pad_id  # pad only ever appears as padding (sentencepiece never emits id 0)


class TextEncoder(nn.Module):
    """T5 encoder: shared embedding -> blocks (relative position bias of block 0) -> final RMS norm."""

    def __init__(self, cfg, tokenizer=None, finetune=False):
        super().__init__()
        self.cfg, self.dim, self.tokenizer, self.finetune = cfg, cfg.d_model, tokenizer, finetune
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)  # HF's encoder.embed_tokens aliases this
        self.encoder = _holder(block=nn.ModuleList(Block(cfg, i == 0) for i in range(cfg.num_layers)),
                               final_layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon))

    def position_bias(self, T, device):  # -> (1, H, T, T)
        pos = torch.arange(T, device=device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                          self.cfg.relative_attention_max_distance)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(bucket).permute(2, 0, 1)[None]

    def forward(self, ids, mask):  # ids (B, T) int64, mask (B, T) bool -> (B, T, D) == HF last_hidden_state
        x = self.shared(ids)
        bias = self.position_bias(ids.shape[1], ids.device).to(x.dtype)
        # Padded keys get the dtype's minimum (as transformers), not -inf: a fully masked row stays finite.
        bias = bias.masked_fill(~mask[:, None, None, :], torch.finfo(x.dtype).min)  # (B, H, T, T)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    def encode(self, captions):  # -> emb (B, T, D) float, mask (B, T) bool
        if isinstance(captions, str) or not captions or not all(c is None or isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a non-empty list of strings (None: no caption), got {captions!r:.80}")
        captions = ["" if c is None else c for c in captions]
        ids, mask = self.tokenizer(captions)
        dev = self.shared.weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            emb = self(ids, mask)
        # An empty caption (the CFG-dropped / unconditional text) is masked out entirely, as audiocraft's
        # T5Conditioner does; emb x mask makes padded and dropped positions exactly zero
        # (PAPER.md "audiocraft: T5 conditioner").
        mask = mask & torch.tensor([c != "" for c in captions], device=dev)[:, None]
        return emb * mask[..., None].to(emb.dtype), mask


def _read_encoder_weights(directory):
    """The encoder's tensors of model.safetensors / pytorch_model.bin (or their sharded *.index.json):
    real checkpoints hold the whole encoder-decoder; decoder.* and lm_head are never read."""
    wanted = lambda k: k == "shared.weight" or k.startswith("encoder.")
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"{directory}: missing weights file model.safetensors (or pytorch_model.bin)")
    shards = [path]
    if name.endswith(".index.json"):  # flan-t5-xl / -xxl come in shards
        with open(path) as f:
            shards = sorted({os.path.join(directory, s) for k, s in json.load(f)["weight_map"].items() if wanted(k)})
    sd = {}
    for shard in shards:
        if shard.endswith(".safetensors"):
            if data.VERIFY:
                data.verify_checksum(shard)  # files we wrote (the toy T5) carry a .sha256
            try:
                with safe_open(shard, framework="pt") as f:
                    sd.update({k: f.get_tensor(k) for k in f.keys() if wanted(k)})
            except Exception as e:  # noqa: BLE001 -- safetensors' own error types: name the file, one line
                raise ValueError(f"{shard}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") \
                    from None
        else:
            sd.update({k: v for k, v in data.torch_load(shard, "T5 weights file").items() if wanted(k)})
    alias = sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; some files hold only one
    if "shared.weight" not in sd and alias is not None:
        sd["shared.weight"] = alias
    return sd, path


def load_t5(directory, device="cpu", max_length=512, finetune=False):
    """TextEncoder of a HF-format T5 directory; frozen and in eval mode unless finetune."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such T5 directory")
    for name in ("config.json", "spiece.model"):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"{directory}: missing {name} (expected a HF-format T5 directory)")
    cfg = config_from_json(os.path.join(directory, "config.json"))
    if data.VERIFY:
        data.verify_checksum(os.path.join(directory, "spiece.model"))
    tok = T5Tokenizer(os.path.join(directory, "spiece.model"), max_length)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"{directory}: spiece.model has {len(tok)} pieces, config.json vocab_size {cfg.vocab_size}")
    model = TextEncoder(cfg, tok, finetune)
    sd, path = _read_encoder_weights(directory)
    data.check_state_dict(model.state_dict(), sd, path, "config.json")
    model.load_state_dict(sd)
    if not finetune:
        model.requires_grad_(False).eval()  # frozen (PAPER.md §3.1)
    return model.to(device)


def init_t5_weights(model, seed=0, factor=1.0):
    """HF T5's init (_init_weights), seeded: normal with fan-in scaled std, norms at 1."""
    cfg = model.cfg
    std = dict(shared=1.0, q=(cfg.d_model * cfg.d_kv) ** -0.5, k=cfg.d_model ** -0.5, v=cfg.d_model ** -0.5,
               o=(cfg.num_heads * cfg.d_kv) ** -0.5, relative_attention_bias=cfg.d_model ** -0.5,
               wi=cfg.d_model ** -0.5, wi_0=cfg.d_model ** -0.5, wi_1=cfg.d_model ** -0.5, wo=cfg.d_ff ** -0.5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # fixed order -> same seed, same weights
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, factor * std[name.split(".")[-2]], generator=g)


def make_toy_t5(directory, captions, seed=0):
    """Write a small random T5 (TOY_T5) as a HF-format directory: spiece.model trained on the captions,
    config.json as transformers writes it for T5EncoderModel, model.safetensors. Deterministic."""
    captions = sorted(c for c in captions if isinstance(c, str) and c.strip())  # sorted: order-independent
    if not captions:
        raise ValueError("make_toy_t5: no non-empty caption to train the sentencepiece model on")
    os.makedirs(directory, exist_ok=True)
    # Seed pieces given explicitly: sentencepiece's own seeding finds only a handful of candidates in a
    # small, repetitive caption set and the vocabulary falls back to single letters. Classic unigram
    # seeding instead: every substring of every word ("▁" marks the word start), weighted by its count.
    seeds = collections.Counter()
    for w in ("▁" + w for c in captions for w in c.split()):
        seeds.update(w[i:j] for i in range(len(w)) for j in range(i + 2, min(len(w), i + 16) + 1))
    buf, cwd = io.BytesIO(), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "seeds.tsv"), "w", encoding="utf-8") as f:
            f.writelines(f"{p}\t{n}\n" for p, n in sorted(seeds.items()))
        os.chdir(tmp)  # spiece.model records the seeds path: a relative one keeps the file byte-reproducible
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(captions), model_writer=buf, model_type="unigram", vocab_size=TOY_SPM_VOCAB,
                hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # T5's ids, no bos
                seed_sentencepieces_file="seeds.tsv", character_coverage=1.0, num_threads=1,  # 1 thread: deterministic
                minloglevel=2)
        finally:
            os.chdir(cwd)
    n_pieces = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    cfg = T5Config(vocab_size=n_pieces + T5_EXTRA_IDS, **TOY_T5)
    model = TextEncoder(cfg)
    init_t5_weights(model, seed)
    hf = dict(asdict(cfg), architectures=["T5EncoderModel"], model_type="t5",
              num_decoder_layers=cfg.num_layers, dropout_rate=0.0,  # 0: we never use dropout
              initializer_factor=1.0, is_encoder_decoder=False, is_decoder=False, pad_token_id=0,
              eos_token_id=1, tie_word_embeddings=True, use_cache=False, dtype="float32")
    data.atomic_write(os.path.join(directory, "spiece.model"), buf.getvalue(), checksum=True)
    weights = os.path.join(directory, "model.safetensors")
    # "format" is read by transformers
    data.atomic_write(weights, lambda tmp: save_file(model.state_dict(), tmp, metadata={"format": "pt"}),
                      checksum=True)
    # config.json last: callers (train.py) take its presence to mean the directory is complete.
    data.atomic_write(os.path.join(directory, "config.json"), json.dumps(hf, indent=2, sort_keys=True) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="Check a T5 directory: print its config, the token ids and "
                                            "embedding statistics of some captions.")
    p.add_argument("t5_dir", help="HF-format T5 directory (config.json, model.safetensors, spiece.model)")
    p.add_argument("captions", nargs="*", default=["a dog barks while a car passes by"], help="captions to encode")
    p.add_argument("--max-length", type=int, default=512, help="tokens per caption, eos included")
    args = p.parse_args(argv)
    try:
        t5 = load_t5(args.t5_dir, max_length=args.max_length)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(t5.cfg)
    emb, mask = t5.encode(args.captions)  # (B, T, D), (B, T)
    for i, c in enumerate(args.captions):
        ids = t5.tokenizer([c])[0][0].tolist()
        rms = emb[i][mask[i]].pow(2).mean().sqrt().item() if mask[i].any() else 0.0
        print(f"{c!r}: {len(ids)} tokens {ids[:16]}{' ...' if len(ids) > 16 else ''}  rms {rms:.4f}")
    print(f"emb {tuple(emb.shape)}  mask {tuple(mask.shape)}")


if __name__ == "__main__":
    main()
