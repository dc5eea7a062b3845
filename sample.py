"""Generate audio from text prompts: a run of train.py, or released MusicGen weights; export a run back to
audiocraft's layout.

    python sample.py --ckpt runs/toy "three high-pitched beeps" "noise"
    python sample.py --musicgen DIR --t5 T5DIR --duration 8 "lo-fi hip hop with a mellow piano"
    python sample.py --ckpt runs/musicgen-small-rr --export exported/

One wav per prompt in --out (default RUN/samples, or ./samples with --musicgen). DIR holds audiocraft's
released `state_dict.bin` (LM) and `compression_state_dict.bin` (EnCodec); T5DIR a local HF T5 directory
(t5-base for MusicGen, PAPER.md "audiocraft: T5 conditioner").
"""
import argparse
import math
import os
import re
import shutil

import soundfile as sf
import torch

import codec as codec_lib
import data
import lm as lm_lib
import text_encoder

LM_PT = "LM checkpoint (lm.pt of a train.py run)"


def _need_file(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _load_lm_pt(path):
    """A run's lm.pt, memory-mapped: cheap even for a big checkpoint."""
    return data.torch_load(path, LM_PT, mmap=True)


def lm_from_checkpoint(ckpt, source, device="cpu", use_ema=True):
    """AudioLM from a train.py lm.pt dict; the EMA weights unless use_ema=False or absent."""
    if not isinstance(ckpt, dict) or "lm_config" not in ckpt or "lm" not in ckpt:
        raise ValueError(f"{source}: expected a train.py lm.pt with 'lm_config' and 'lm' entries")
    try:
        cfg = lm_lib.lm_config(ckpt["lm_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad lm_config {ckpt['lm_config']}: {e}") from None
    which = "lm_ema" if use_ema and ckpt.get("lm_ema") else "lm"
    lm = lm_lib.lm_from_state_dict(cfg, ckpt[which], f"{source} [{which}]")
    return lm.to(device).eval()


def _run_files(path):
    """A run directory or its lm.pt -> (lm.pt path, its dict, {'codec': path, 't5': path})."""
    lm_pt = os.path.join(path, "lm.pt") if os.path.isdir(path) else path
    ckpt = _load_lm_pt(lm_pt)
    run_dir = os.path.dirname(os.path.abspath(lm_pt))
    paths = {}
    for key in ("codec", "t5"):
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), str):
            raise ValueError(f"{lm_pt}: missing the '{key}' path entry")
        paths[key] = _need_file(os.path.join(run_dir, ckpt[key]), f"{key} of {lm_pt}")
    return lm_pt, ckpt, paths


def load_run(path, device="cpu", use_ema=True):
    """(codec, t5, lm) of a train.py run directory or its lm.pt; codec / T5 paths in lm.pt are relative to the
    run directory when they lie inside it (train.run_relative), so a run directory can be moved."""
    lm_pt, ckpt, paths = _run_files(path)
    lm = lm_from_checkpoint(ckpt, lm_pt, device, use_ema)  # state-dict mismatches surface before heavy loads
    codec = codec_lib.load_codec(paths["codec"], device=device)
    t5 = text_encoder.load_t5(paths["t5"], device=device)
    lm_lib.check_compatible(codec, t5, lm.cfg, lm_pt)
    return codec, t5, lm


def load_musicgen_dir(directory, t5_dir, device="cpu"):
    """(codec, t5, lm) from released MusicGen files and a local T5 directory."""
    lm_path = _need_file(os.path.join(directory, "state_dict.bin"), "MusicGen LM weights")
    codec_path = _need_file(os.path.join(directory, "compression_state_dict.bin"), "MusicGen EnCodec weights")
    _need_file(t5_dir, "T5 directory")
    lm = lm_lib.load_musicgen(lm_path, device)
    codec = codec_lib.load_audiocraft(codec_path).to(device).eval()
    t5 = text_encoder.load_t5(t5_dir, device=device)
    lm_lib.check_compatible(codec, t5, lm.cfg, lm_path)
    return codec, t5, lm


def num_frames_for(duration, frame_rate, max_frames):
    """Frames for `duration` seconds; errors when the LM's positions cannot hold them."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    n = math.ceil(duration * frame_rate - 1e-6)
    if n > max_frames:
        raise ValueError(f"duration {duration} s needs {n} frames at {frame_rate:g} Hz, but the LM has positions "
                         f"for {max_frames} frames ({max_frames / frame_rate:g} s)")
    return n


def generate_audio(codec, t5, lm, prompts, duration, cfg_coef=3.0, top_k=250, top_p=0.0,
                   temperature=1.0, seed=None, generator=None, progress=True):
    """list of B captions -> wav (B, 1, N) on the codec's device, N = duration * sample_rate.
    Defaults: CFG 3.0, top-k 250, temperature 1.0 (PAPER.md §4.2; PAPER.md "audiocraft: sampling")."""
    if not prompts:
        raise ValueError("no prompts given")
    T = num_frames_for(duration, codec.frame_rate, lm.cfg.max_frames)
    device = next(lm.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    with torch.no_grad():
        text, mask = t5.encode(list(prompts))  # (B, Tt, Dt), (B, Tt)
    codes = lm_lib.generate(lm, text, mask, T, cfg_coef=cfg_coef, top_k=top_k, top_p=top_p, temperature=temperature,
                            generator=generator, progress=progress)  # (B, K, T)
    with torch.no_grad():
        wav = codec.decode(codes.clone().to(next(codec.parameters()).device))  # (B, 1, N')
    return wav[..., :round(duration * codec.sample_rate)]


def export_run(path, out, use_ema=True):
    """A train.py run -> `out` in the layout of audiocraft's released models: state_dict.bin (lm.save_musicgen) and,
    when the run's codec is an audiocraft compression_state_dict.bin, a copy of it under that name (our own codec.py
    checkpoints have no audiocraft counterpart). -> lines that say how to load the result."""
    lm_pt, ckpt, paths = _run_files(path)
    lm = lm_from_checkpoint(ckpt, lm_pt, use_ema=use_ema)
    tc = ckpt.get("train_config") or {}
    codec_path = paths["codec"]
    audiocraft_codec = "xp.cfg" in data.torch_load(codec_path, "codec checkpoint", mmap=True)
    lm_path = lm_lib.save_musicgen(lm, os.path.join(out, "state_dict.bin"), cfg_prob=tc.get("cfg_prob", 0.3),
                                   cfg_coef=run_defaults(lm_pt)["cfg_coef"])
    lines = [f"wrote {lm_path} ({'EMA' if use_ema else 'raw'} weights of {lm_pt}, step {ckpt.get('step')})"]
    if audiocraft_codec:
        def copy(tmp):
            shutil.copyfile(codec_path, tmp)
        data.atomic_write(os.path.join(out, "compression_state_dict.bin"), copy)
        lines.append(f"copied {codec_path} -> {os.path.join(out, 'compression_state_dict.bin')}")
        lines.append(f"audiocraft:   MusicGen.get_pretrained({out!r})  (a local directory with both files)")
    else:
        lines.append(f"not copied: {codec_path} is a codec.py checkpoint, which audiocraft cannot load; "
                     "use lm.load_musicgen / sample.py --musicgen with it")
    c = lm.cfg
    lines += ["transformers: MusicgenForCausalLM, with the key renames of transformers' convert_musicgen_transformers:",
              f"    sd, proj = rename_state_dict(torch.load({lm_path!r})['best_state'], hidden_size={c.dim})",
              f"    cfg = MusicgenDecoderConfig(hidden_size={c.dim}, num_hidden_layers={c.num_layers}, "
              f"num_attention_heads={c.num_heads}, ffn_dim={c.hidden_scale * c.dim}, num_codebooks={c.num_codebooks}, "
              f"vocab_size={c.card}, tie_word_embeddings=False)",
              "    decoder = MusicgenForCausalLM(cfg); decoder.load_state_dict(sd, strict=False)  # missing: "
              "embed_positions",
              "    (in a MusicgenForConditionalGeneration of the same size: model.decoder.load_state_dict(sd, "
              "strict=False); model.enc_to_dec_proj.load_state_dict(proj))"]
    return lines


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "prompt"


PAPER_SAMPLING = dict(duration=10.0, cfg_coef=3.0, top_k=250)  # PAPER.md §4.2; PAPER.md "audiocraft: sampling"


def run_defaults(path=None):
    """Sampling defaults of a train.py run (its directory or lm.pt): the training segment length and the CFG
    coefficient and top-k its train_config recorded (sample_cfg_coef, sample_top_k); the paper's where the run
    has none, or for path None (released weights)."""
    out = dict(PAPER_SAMPLING)
    if path is None:
        return out
    ckpt = _load_lm_pt(os.path.join(path, "lm.pt") if os.path.isdir(path) else path)
    tc = (ckpt.get("train_config") if isinstance(ckpt, dict) else None) or {}
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for key in ("segment_seconds", "segment_duration", "duration"):
        if number(tc.get(key)) and tc[key] > 0:
            out["duration"] = float(tc[key])
            break
    if number(tc.get("sample_cfg_coef")):
        out["cfg_coef"] = float(tc["sample_cfg_coef"])
    if number(tc.get("sample_top_k")) and tc["sample_top_k"] >= 0:
        out["top_k"] = int(tc["sample_top_k"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Text-to-audio sampling with a trained LM or released MusicGen.")
    ap.add_argument("prompts", nargs="*", help="one or more text prompts (one wav each)")
    ap.add_argument("--ckpt", help="train.py run directory or its lm.pt")
    ap.add_argument("--musicgen", help="directory with released state_dict.bin and compression_state_dict.bin")
    ap.add_argument("--t5", help="local T5 directory (HF format) for --musicgen, e.g. t5-base")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per sample (default: the run's training segment, else 10)")
    ap.add_argument("--cfg-coef", type=float, default=None,
                    help="classifier-free guidance coefficient (default: the run's sample_cfg_coef, else 3.0)")
    ap.add_argument("--top-k", type=int, default=None,
                    help="top-k sampling, 0: off, 1: greedy (default: the run's sample_top_k, else 250)")
    ap.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling; replaces top-k when > 0")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--out", help="output directory (default RUN/samples or ./samples)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--no-ema", action="store_true", help="use the raw LM weights instead of the EMA")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    ap.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the checkpoint files")
    ap.add_argument("--export", metavar="DIR", help="instead of sampling: write the --ckpt run as audiocraft's "
                    "state_dict.bin (+ compression_state_dict.bin when its codec is audiocraft's) in DIR")
    args = ap.parse_args(argv)

    def fail(msg):
        raise SystemExit(f"sample.py: error: {msg}")
    # every check on the arguments comes before any loading or generation
    if bool(args.ckpt) == bool(args.musicgen):
        fail("give exactly one of --ckpt RUN or --musicgen DIR")
    if args.musicgen and not args.t5:
        fail("--musicgen needs --t5 T5DIR (MusicGen was trained with t5-base)")
    if args.export:
        if not args.ckpt or args.prompts:
            fail("--export DIR takes a --ckpt RUN and no prompts")
        if not os.path.exists(args.ckpt):
            fail(f"run not found: {args.ckpt}")
        verify_before, data.VERIFY = data.VERIFY, not args.no_verify
        try:
            print("\n".join(export_run(args.ckpt, args.export, use_ema=not args.no_ema)))
        except (OSError, ValueError) as e:
            fail(str(e))
        finally:
            data.VERIFY = verify_before
        return
    if not args.prompts:
        fail("no prompts given; pass one or more text prompts")
    blank = [i for i, p in enumerate(args.prompts) if not p.strip()]
    if blank:
        fail(f"prompt(s) {blank} are empty")
    if args.duration is not None and not 0 < args.duration < math.inf:
        fail(f"--duration {args.duration}: expected a finite number of seconds > 0")
    if args.cfg_coef is not None and not math.isfinite(args.cfg_coef):
        fail(f"--cfg-coef {args.cfg_coef}: expected a finite number")
    if (args.top_k is not None and args.top_k < 0) or not 0 <= args.top_p <= 1 or not 0 <= args.temperature < \
            math.inf or args.batch_size < 1:
        fail("need --top-k >= 0, 0 <= --top-p <= 1, a finite --temperature >= 0, --batch-size >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device} but CUDA is not available")
    src = args.ckpt or args.musicgen
    if not os.path.exists(src):
        fail(f"{'run' if args.ckpt else 'MusicGen directory'} not found: {src}")
    out = args.out or (os.path.join(args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt), "samples")
                       if args.ckpt else "samples")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create the output directory ({e.strerror or e})")
    verify_before, data.VERIFY = data.VERIFY, not args.no_verify
    try:
        defaults = run_defaults(args.ckpt)
        duration = args.duration or defaults["duration"]
        cfg_coef = defaults["cfg_coef"] if args.cfg_coef is None else args.cfg_coef
        top_k = defaults["top_k"] if args.top_k is None else args.top_k
        if args.ckpt:
            codec, t5, lm = load_run(args.ckpt, args.device, use_ema=not args.no_ema)
        else:
            codec, t5, lm = load_musicgen_dir(args.musicgen, args.t5, args.device)
        num_frames_for(duration, codec.frame_rate, lm.cfg.max_frames)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    finally:
        data.VERIFY = verify_before
    gen = torch.Generator(device=next(lm.parameters()).device).manual_seed(args.seed)
    for i0 in range(0, len(args.prompts), args.batch_size):
        batch = args.prompts[i0:i0 + args.batch_size]
        wav = generate_audio(codec, t5, lm, batch, duration, cfg_coef, top_k, args.top_p,
                             args.temperature, generator=gen).float().cpu()
        for j, (prompt, w) in enumerate(zip(batch, wav)):
            w = w[0] / max(1.0, w.abs().max().item() / 0.99)  # scale down only if it would clip
            path = os.path.join(out, f"{i0 + j:03d}_{_slug(prompt)}.wav")
            sf.write(path, w.numpy(), codec.sample_rate, subtype="PCM_16")
            print(f"wrote {path}  ({duration:g} s) {prompt!r}")


if __name__ == "__main__":
    main()
