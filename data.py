"""Data: safe file I/O, the toy sound-event set, the manifest dataset (ours and audiocraft's layout), and the
sources train.py reads its steps from (cached codec tokens or audio crops).

Toy set: 2.0 s, 16 kHz mono clips holding 1-3 events of one sound -- sine ("beep", "tone"),
square ("buzz"), sawtooth ("synth note", "sawtooth") or white noise ("noise burst", "hiss") -- at
220 / 440 / 880 Hz (+-2% per clip), captioned from templates with synonyms. A few attribute combinations
occur only in the test split, to measure compositional control. It is written as wav files plus the same
JSONL manifest users write, so it goes through exactly the code path of a real dataset:
  {"path": "wav/train/00000.wav", "text": "three high-pitched beeps", "duration": 2.0,
   "attributes": {"count": 3, "pitch": "high", "kind": "sine", "held_out": false}}
Manifests: our JSONL (`path`, `text`, optional `offset`, `duration`; relative paths resolved against the
manifest's folder) or audiocraft's (`path`, `duration`, `sample_rate`; caption = `description` of the
sidecar .json beside the audio file). `.jsonl.gz` is read too.
Usage: python data.py [--root data/toy --seed 0]   # writes the toy set and prints its sizes and timing
"""
import argparse
import collections
import gzip
import hashlib
import json
import math
import os
import pickle
import time
import typing
import warnings

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm


# ----------------------------------------------------------------------------- files: atomic writes, checksums, safe loads
VERIFY = True  # torch_load checks SHA-256 sidecars; train.py / sample.py --no-verify turn it off


def sha256_file(path, chunk=1 << 24):
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_error(path, e):
    """A failed write (disk full, quota, permissions) -> one OSError naming the file. torch.save reports a failed
    write as a RuntimeError of its zip writer, whose first line names the cause."""
    reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return OSError(f"cannot write {path}: {reason}")


class _HashingFile:
    """A write-only file object that hashes what passes through it (hash while writing: no second read)."""

    def __init__(self, f):
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, b):
        self.sha.update(b)
        try:
            return self.f.write(b)
        except OSError as e:  # torch.save would replace it by an uninformative "unexpected pos"
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_write(path, content, checksum=False):
    """Write str / bytes `content`, or call `content(tmp)` to write the file, at a temporary name beside `path`,
    then os.replace: a crash or kill never leaves a half-written file under the real name. The temporary name
    holds the pid, so ranks writing the same file do not collide; a failed write removes it and raises one
    OSError naming `path` (write_error). checksum: also keep `path.sha256` (lines `<sha256>  <name>`, the
    sha256sum format) for torch_load to check: while the file is replaced it lists the old and the new digest,
    so a crash at any moment leaves a file that matches. A callable may return the digest it computed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, side = f"{path}.{os.getpid()}.tmp", f"{path}.sha256"
    try:
        try:
            if callable(content):
                digest = content(tmp)
            else:
                content = content.encode("utf-8") if isinstance(content, str) else content
                with open(tmp, "wb") as f:
                    f.write(content)
                digest = hashlib.sha256(content).hexdigest()
        except (OSError, RuntimeError) as e:
            raise write_error(path, e) from None
        if checksum:
            digest = digest or sha256_file(tmp)
            line = f"{digest}  {os.path.basename(path)}\n"
            atomic_write(side, line + (open(side).read() if os.path.exists(side) else ""))
        os.replace(tmp, path)
        if checksum:
            atomic_write(side, line)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically (atomic_write), with its SHA-256 sidecar computed while writing. Saved through a file
    object, so the archive's inner folder name does not depend on the temporary file name: the same object gives
    the same bytes."""
    def save(tmp):
        with open(tmp, "wb") as f:
            out = _HashingFile(f)
            try:
                torch.save(obj, out)
            except RuntimeError as e:
                raise (out.error or e) from None
        return out.sha.hexdigest()
    atomic_write(path, save, checksum=True)


def verify_checksum(path, digests=None, source=None):
    """Raise ValueError naming `path` when its SHA-256 is not one of `digests` (recorded in `source`; default: those
    its `.sha256` sidecar lists; no sidecar, e.g. a file someone else wrote: nothing to check)."""
    side = source or f"{path}.sha256"
    if digests is None:
        if not os.path.isfile(side):
            return
        with open(side) as f:
            digests = [line.split()[0] for line in f if line.strip()]
    got = sha256_file(path)
    if got not in digests:
        raise ValueError(f"{path}: damaged: its SHA-256 {got[:16]}... is not the {digests[0][:16]}... recorded when "
                         f"it was written ({side}); restore the file, "
                         "or pass --no-verify to load it anyway")


def torch_load(path, what, mmap=False, verify=None):
    """torch.load(weights_only=True) of a file that may come from anyone -> its object. A missing, damaged
    (verify_checksum, unless verify is False or --no-verify) or unreadable file is a one-line error naming it.
    Older audiocraft files pickle their xp.cfg as an omegaconf DictConfig: those load with exactly the types such
    a config pickles to allowed (found with torch.serialization.get_unsafe_globals_in_checkpoint), and only when
    omegaconf is installed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    if VERIFY if verify is None else verify:
        verify_checksum(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 -- any failure is the user's file: name it, briefly
        msg = (str(e).split("WeightsUnpickler error:")[-1].strip() or type(e).__name__).splitlines()[0][:300]
        if not (isinstance(e, pickle.UnpicklingError) and "omegaconf" in str(e)):
            raise ValueError(f"{path}: not a {what} that torch.load(weights_only=True) reads: {msg}") from None
    try:  # optional dependency: only these old files need it
        from omegaconf import DictConfig, ListConfig, base, nodes
    except ImportError:
        raise ValueError(f"{path}: its 'xp.cfg' is a pickled omegaconf config; `pip install omegaconf` "
                         "to read it") from None
    allowed = [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, nodes.AnyNode, typing.Any,
               collections.defaultdict, dict, list, int]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def xp_config(xp, path):
    """audiocraft's 'xp.cfg' of a released checkpoint -> a plain dict. Exported files hold it as YAML text
    (OmegaConf.to_yaml), older ones as an omegaconf DictConfig, our tests as a dict."""
    if isinstance(xp, str):
        try:
            xp = yaml.safe_load(xp)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: 'xp.cfg' is not valid YAML ({str(e).splitlines()[0]})") from None
    elif type(xp).__module__.startswith("omegaconf"):  # then torch_load has imported omegaconf
        from omegaconf import OmegaConf
        xp = OmegaConf.to_container(xp, resolve=False)
    if not isinstance(xp, dict):
        raise ValueError(f"{path}: 'xp.cfg' is a {type(xp).__name__}, expected a config mapping")
    return xp


def check_state_dict(expected, sd, source, target):
    """Raise one ValueError naming every missing / unexpected key and shape mismatch (the first 10 of each) of
    the state dict `sd` read from `source` against `expected` (a model's state_dict()), instead of
    load_state_dict's traceback; `target` says what it should fit."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(v)}): {v[:10]}" for name, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if v]
        raise ValueError(f"{source}: weights do not fit {target}: " + "; ".join(parts))


# ----------------------------------------------------------------------------- the toy set
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
KINDS = ("sine", "square", "sawtooth", "noise")
PITCHES = ("low", "mid", "high")
PITCH_HZ = {"low": 220.0, "mid": 440.0, "high": 880.0}
COUNTS = (1, 2, 3)
ALL_COMBOS = [dict(count=c, pitch=None if k == "noise" else p, kind=k)
              for k in KINDS for p in (PITCHES if k != "noise" else (None,)) for c in COUNTS]  # 27 tonal + 3 noise
# Only in test. Every count, pitch and kind still occurs in train within other combinations, so the
# LM can only get these right by composing attributes it learned separately.
HELD_OUT_COMBOS = [dict(count=1, pitch="high", kind="square"), dict(count=2, pitch="low", kind="sawtooth"),
                   dict(count=3, pitch="mid", kind="sine"), dict(count=2, pitch="mid", kind="square"),
                   dict(count=3, pitch=None, kind="noise")]
SEEN_COMBOS = [c for c in ALL_COMBOS if c not in HELD_OUT_COMBOS]  # 25
DEFAULT_SIZES = dict(n_train=2500, n_valid=100, n_test=150)  # train: 100 clips per seen combo
EVENT_SECONDS = (0.20, 0.30)
MIN_GAP, EDGE = 0.12, 0.05  # silence between events; silence kept at both ends of the clip
ATTACK, RELEASE = 0.010, 0.030
PEAK = (0.3, 0.6)

COUNT_WORDS = {1: ("one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}
PITCH_WORDS = {"low": ("low", "deep", "low-pitched"), "mid": ("mid", "medium-pitched"),
               "high": ("high", "high-pitched", "shrill")}
NOUNS = {"sine": (("beep", "beeps"), ("tone", "tones")), "square": (("buzz", "buzzes"),),
         "sawtooth": (("synth note", "synth notes"), ("sawtooth", "sawtooths")),
         "noise": (("noise burst", "noise bursts"), ("burst of noise", "bursts of noise"), ("hiss", "hisses"))}
TEMPLATES = ("{}", "{}", "the sound of {}")  # bare phrase twice as likely


def _check_combo(count, pitch, kind):
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    if count not in COUNT_WORDS:
        raise ValueError(f"count {count!r}: expected one of {COUNTS}")
    if kind != "noise" and pitch not in PITCH_HZ:
        raise ValueError(f"pitch {pitch!r}: expected one of {PITCHES} for kind {kind!r}")


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def make_caption(count, pitch, kind, rng):
    """e.g. 'three high-pitched beeps', 'a single low buzz', 'the sound of two bursts of noise'."""
    _check_combo(count, pitch, kind)
    noun = _pick(rng, NOUNS[kind])[0 if count == 1 else 1]
    words = [_pick(rng, COUNT_WORDS[count])] + ([] if kind == "noise" else [_pick(rng, PITCH_WORDS[pitch])])
    return _pick(rng, TEMPLATES).format(" ".join(words + [noun]))


def _event(kind, f0, n, sr, rng):
    """One event of n samples, before the clip's peak normalisation: (n,) float64."""
    if kind == "noise":
        x = rng.standard_normal(n)
    else:
        t = np.arange(n) / sr
        phase = rng.uniform(0, 2 * np.pi)
        # Additive synthesis with only the harmonics below 0.95 * Nyquist: band-limited, nothing aliases.
        # Ideal Fourier series: square = odd harmonics 1/h, sawtooth = all harmonics 1/h.
        hs = {"sine": [1], "square": range(1, 64, 2), "sawtooth": range(1, 64)}[kind]
        x = sum(np.sin(2 * np.pi * h * f0 * t + h * phase) / h for h in hs if h * f0 < 0.95 * sr / 2)
    env = np.ones(n)
    na, nr = int(ATTACK * sr), int(RELEASE * sr)
    env[:na] = np.sin(np.linspace(0, np.pi / 2, na)) ** 2  # raised-cosine ramps: no clicks, little splatter
    env[n - nr:] = np.cos(np.linspace(0, np.pi / 2, nr)) ** 2
    return x * env


def synth_clip(count, pitch, kind, rng, sample_rate=SAMPLE_RATE, duration=CLIP_SECONDS):
    """count events (0.20-0.30 s each, >= 0.12 s apart) of one sound, peak 0.3-0.6 -> (N,) float32."""
    _check_combo(count, pitch, kind)
    n = int(round(duration * sample_rate))
    f0 = None if kind == "noise" else PITCH_HZ[pitch] * rng.uniform(0.98, 1.02)  # one detune per clip
    lengths = rng.uniform(*EVENT_SECONDS, size=count)
    slack = duration - lengths.sum() - (count - 1) * MIN_GAP - 2 * EDGE
    if slack < 0:
        raise ValueError(f"{count} events do not fit in {duration} s")
    # sorted uniform cut points split the slack into lead-in, extra gaps and tail: random placement
    packed = np.concatenate([[0.0], np.cumsum(lengths + MIN_GAP)[:-1]])  # (count,) starts with minimal gaps
    starts = EDGE + np.sort(rng.uniform(0, slack, size=count)) + packed
    x = np.zeros(n)
    for s, l in zip(starts, lengths):
        i, m = int(round(s * sample_rate)), int(round(l * sample_rate))
        x[i:i + m] += _event(kind, f0, m, sample_rate, rng)
    return (x * rng.uniform(*PEAK) / np.abs(x).max()).astype(np.float32)


def _balanced(combos, n, rng):
    """n combos in rounds of random permutations: every prefix is (nearly) balanced."""
    out = []
    while len(out) < n:
        out += [combos[j] for j in rng.permutation(len(combos))]
    return out[:n]


def _split_combos(split, n, rng):
    if split != "test":
        return _balanced(SEEN_COMBOS, n, rng)
    held, seen = _balanced(HELD_OUT_COMBOS, (n + 1) // 2, rng), _balanced(SEEN_COMBOS, n // 2, rng)
    return [c for pair in zip(held, seen) for c in pair] + held[len(seen):]  # alternate held-out / seen


def _meta(seed, sizes):
    return json.dumps(dict(version=1, seed=seed, sample_rate=SAMPLE_RATE, **sizes), sort_keys=True)


def make_toy_dataset(root, seed=0, n_train=DEFAULT_SIZES["n_train"], n_valid=DEFAULT_SIZES["n_valid"],
                     n_test=DEFAULT_SIZES["n_test"], progress=True):
    """Write root/{train,valid,test}.jsonl and root/wav/<split>/NNNNN.wav -> {split: manifest path}.
    Clip i of a split depends only on (seed, split, i). Manifests are written last (atomically), so a
    set is complete iff its manifests exist; wavs are replaced atomically too (safe with several ranks)."""
    sizes = dict(n_train=n_train, n_valid=n_valid, n_test=n_test)
    out = {}
    for s_idx, split in enumerate(("train", "valid", "test")):
        n = sizes["n_" + split]
        combos = _split_combos(split, n, np.random.default_rng([seed, s_idx, 1]))
        os.makedirs(os.path.join(root, "wav", split), exist_ok=True)
        lines = []
        for i in tqdm(range(n), desc=f"toy {split}", disable=not progress):
            rng = np.random.default_rng([seed, s_idx, 0, i])
            c = combos[i]
            text = make_caption(c["count"], c["pitch"], c["kind"], rng)
            wav = synth_clip(c["count"], c["pitch"], c["kind"], rng)
            rel = f"wav/{split}/{i:05d}.wav"
            atomic_write(os.path.join(root, rel),
                         lambda tmp: sf.write(tmp, wav, SAMPLE_RATE, subtype="PCM_16", format="WAV"))
            attrs = dict(c, held_out=c in HELD_OUT_COMBOS)
            lines.append(json.dumps(dict(path=rel, text=text, duration=CLIP_SECONDS, attributes=attrs)))
        out[split] = os.path.join(root, f"{split}.jsonl")
        atomic_write(out[split], "\n".join(lines) + "\n")
    atomic_write(os.path.join(root, "toy_meta.json"), _meta(seed, sizes))
    return out


def ensure_toy_dataset(root, seed=0, progress=True, **sizes):
    """Make the toy set unless root already holds it with this seed and these sizes -> {split: manifest}."""
    sizes = dict(DEFAULT_SIZES, **sizes)
    out = {s: os.path.join(root, f"{s}.jsonl") for s in ("train", "valid", "test")}
    meta = os.path.join(root, "toy_meta.json")
    if all(map(os.path.exists, out.values())) and os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            if f.read() == _meta(seed, sizes):
                return out
    return make_toy_dataset(root, seed=seed, progress=progress, **sizes)


# ----------------------------------------------------------------------------- manifests
class ManifestError(ValueError):
    """A bad manifest line: the message names the manifest, the line number and the problem."""


def _parse_line(raw, base):
    """One manifest line -> item dict, or raise ValueError(problem)."""
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    if not isinstance(d.get("path"), str) or not d["path"]:
        raise ValueError(f"'path' must be a non-empty string, got {d.get('path')!r}")
    path = os.path.normpath(os.path.join(base, d["path"]))  # absolute paths stay as they are
    if "text" in d:
        text, where = d["text"], "'text'"
    else:  # audiocraft layout: the caption is the 'description' of a sidecar .json next to the audio
        side = os.path.splitext(path)[0] + ".json"
        if not os.path.exists(side):
            raise ValueError(f"no 'text' field and no sidecar {side} with a 'description'")
        try:
            with open(side, encoding="utf-8") as f:
                text, where = json.load(f).get("description"), f"'description' of {side}"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"sidecar {side} is not a JSON object ({e})") from None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"caption ({where}) must be a non-empty string, got {text!r}")
    offset, duration, attrs = d.get("offset", 0.0), d.get("duration"), d.get("attributes")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not number(offset) or offset < 0:
        raise ValueError(f"'offset' must be a finite number >= 0, got {offset!r}")
    if duration is not None and (not number(duration) or duration <= 0):
        raise ValueError(f"'duration' must be a finite number > 0, got {duration!r}")
    if attrs is not None and not isinstance(attrs, dict):
        raise ValueError(f"'attributes' must be an object, got {attrs!r}")
    if not os.path.isfile(path):
        raise ValueError(f"audio file not found: {path}")
    try:  # header only: cheap, and a corrupt file fails here rather than deep inside training
        info = sf.info(path)
        file_seconds = info.frames / info.samplerate
    except Exception as e:
        raise ValueError(f"unreadable audio file {path}: {e}") from None
    promised = wav_promised_frames(path)
    if promised is not None and info.frames < promised:
        raise ValueError(f"truncated audio file {path}: its header promises {promised} samples, it holds "
                         f"{info.frames}")
    if file_seconds <= offset:
        raise ValueError(f"'offset' {offset} s is past the end of {path} ({file_seconds:.3f} s)")
    # duration of the usable segment; audiocraft's 'duration' is the file's, so clamp to what is there
    duration = min(duration or math.inf, file_seconds - offset)
    return dict(path=path, text=text.strip(), offset=float(offset), duration=float(duration), attributes=attrs)


def wav_promised_frames(path):
    """Frames a RIFF/WAVE file's header promises (its data chunk's size / block align), or None for other formats
    and unset sizes. libsndfile silently reports what is there, so a truncated copy is found only this way."""
    with open(path, "rb") as f:
        if f.read(4) != b"RIFF" or f.read(8)[4:] != b"WAVE":
            return None
        align = None
        while len(chunk := f.read(8)) == 8:
            cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"fmt ":
                fmt = f.read(size + size % 2)
                align = int.from_bytes(fmt[12:14], "little")
            elif cid == b"data":
                return size // align if align and 0 < size < 0xFFFFFFFF else None
            else:
                f.seek(size + size % 2, 1)  # chunks are word-aligned
    return None


def read_manifest(path, skip_bad=False):
    """-> (items, n_skipped). Each item: path (absolute), text, offset, duration (s), attributes (or None),
    manifest, line. A bad line raises ManifestError, or with skip_bad is counted (one warning)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read manifest ({e})") from None
    base = os.path.dirname(os.path.abspath(path))
    items, bad = [], []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing one) are not items
        try:
            items.append(dict(_parse_line(raw, base), manifest=str(path), line=lineno))
        except ValueError as e:
            if not skip_bad:
                raise ManifestError(f"{path} line {lineno}: {e}") from None
            bad.append(f"line {lineno}: {e}")
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} bad item(s); first: {bad[0]}")
    return items, len(bad)


def load_audio(path, sample_rate, offset=0.0, duration=None):
    """Read [offset, offset + duration) s of a file -> (1, N) float32 mono at sample_rate (soxr). ValueError on
    non-finite samples (a float file can hold them; they would make the loss NaN)."""
    info = sf.info(path)
    start = int(round(offset * info.samplerate))
    frames = -1 if duration is None else int(round(duration * info.samplerate))
    x = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)[0].mean(1)  # (n, C) -> (n,)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: holds NaN or infinite samples (at {np.flatnonzero(~np.isfinite(x))[0] + start} "
                         f"of {info.frames})")
    if info.samplerate != sample_rate:
        n = int(round(len(x) * sample_rate / info.samplerate))
        x = soxr.resample(x, info.samplerate, sample_rate, quality="HQ")[:n]
        x = np.pad(x, (0, n - len(x)))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]  # (1, N)


class AudioTextDataset(torch.utils.data.Dataset):
    """Manifest items as fixed-length crops: dict(wav (1, N), mask (N,) bool, text, attributes, index).
    segment_seconds None = whole items (collate pads). The crop of item i depends only on
    (seed, epoch, i): call set_epoch(e) each epoch for fresh crops that a resumed run repeats exactly."""

    def __init__(self, manifest, sample_rate, segment_seconds, skip_bad=False, random_crop=True, seed=0):
        self.items, self.n_skipped = read_manifest(manifest, skip_bad=skip_bad)
        if not self.items:
            raise ManifestError(f"{manifest}: no usable items")
        self.sample_rate, self.segment_seconds = sample_rate, segment_seconds
        self.random_crop, self.seed, self.epoch = random_crop, seed, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it, sr = self.items[i], self.sample_rate
        avail = int(round(it["duration"] * sr))  # samples of the item at the target rate
        seg = avail if self.segment_seconds is None else int(round(self.segment_seconds * sr))
        start = 0
        if self.random_crop and avail > seg:
            start = int(np.random.default_rng([self.seed, self.epoch, i]).integers(avail - seg + 1))
        try:
            wav = load_audio(it["path"], sr, it["offset"] + start / sr, min(seg, avail - start) / sr)
        except Exception as e:
            raise ManifestError(f"{it['manifest']} line {it['line']}: cannot decode {it['path']}: {e}") from None
        n = min(wav.shape[1], seg)
        mask = torch.zeros(seg, dtype=torch.bool)
        mask[:n] = True
        wav = torch.nn.functional.pad(wav[:, :n], (0, seg - n))  # (1, seg), zeros where mask is False
        return dict(wav=wav, mask=mask, text=it["text"], attributes=it["attributes"], index=i)


def collate(batch):
    """list of items -> dict(wav (B, 1, N), mask (B, N), text [B], attributes [B], index (B,));
    items of different lengths are zero-padded to the longest (mask False there)."""
    n = max(b["wav"].shape[-1] for b in batch)
    pad = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[-1]))
    return dict(wav=torch.stack([pad(b["wav"]) for b in batch]), mask=torch.stack([pad(b["mask"]) for b in batch]),
                text=[b["text"] for b in batch], attributes=[b["attributes"] for b in batch],
                index=torch.tensor([b["index"] for b in batch]))



# ----------------------------------------------------------------------------- training sources
# What train.py reads a step from: cached codec tokens (the default) or audio crops encoded at every step.
# Both give batch(pairs, device) -> codes (B, K, T) int64, frame mask (B, T) bool, texts, for the
# (epoch, item) pairs of the step, and every crop is a function of (seed, epoch, item), so a resumed or
# re-sharded run reads the same data.

def rng(*key):
    """numpy generator seeded by a tuple: the data order, crops and CFG draws are functions of (seed, step)."""
    return np.random.default_rng([int(k) for k in key])


def all_reduce(x, op=dist.ReduceOp.SUM):
    dist.all_reduce(x, op=op)
    return x


def fail_together(err, kind=ValueError):
    """Raise `kind` (ValueError; OSError for write failures) on EVERY rank if any rank hit an error (a rank
    raising alone would leave the others waiting in the next collective)."""
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    first = next((e for e in errs if e), None)
    if first:
        raise kind(first)


class TokenSource:
    """Cached codec tokens of a manifest: full-clip codes (K, sum T_i) int16 + offsets; crops in token space."""

    def __init__(self, path, seg_frames, random_crop, seed):
        d = torch_load(path, "token cache", mmap=True)
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
    """--no-cache-tokens: crops of the audio (AudioTextDataset) encoded by the frozen codec at every step."""

    def __init__(self, manifest, codec, cfg, random_crop):
        self.ds = AudioTextDataset(manifest, codec.sample_rate, cfg.segment_seconds, cfg.skip_bad, random_crop,
                                   cfg.seed)
        self.texts, self.codec = [it["text"] for it in self.ds.items], codec

    def __len__(self):
        return len(self.texts)

    @torch.no_grad()
    def batch(self, pairs, device):
        items = []
        for epoch, i in pairs:
            self.ds.set_epoch(epoch)
            items.append(self.ds[i])
        b = collate(items)
        codes = self.codec.encode(b["wav"].to(device))  # (B, K, T)
        mask = b["mask"][:, ::self.codec.hop_length][:, :codes.shape[-1]].to(device)  # frame real iff its 1st sample is
        return codes, mask, b["text"]


def file_digest(path):
    """SHA-256 of a file: the one its sidecar recorded when it was written (no read), else computed."""
    side = f"{path}.sha256"
    if os.path.isfile(side):
        lines = open(side).read().split("\n")
        if len([x for x in lines if x.strip()]) == 1:
            return lines[0].split()[0]
    return sha256_file(path)


def data_digest(manifest, items):
    """SHA-256 over the manifest's bytes and each audio file's path, size and mtime: it changes when a line or an
    audio file does."""
    with open(manifest, "rb") as f:
        h = hashlib.sha256(f.read())
    for it in items:
        st = os.stat(it["path"])
        h.update(f"{it['path']}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_tokens(manifest, codec, cfg, rank, world, device):
    """Encode every item of the manifest once, whole (ranks share the work) -> path of the cache file. Keyed on
    content: reused while the manifest's bytes, its audio files (size, mtime) and the codec file (SHA-256) are
    unchanged; a stale or damaged cache is rebuilt, with one line saying why. cfg: train.py's TrainConfig (codec,
    cache_dir, run_dir, skip_bad)."""
    items, _ = read_manifest(manifest, skip_bad=cfg.skip_bad)
    meta = dict(data=data_digest(manifest, items), codec=file_digest(cfg.codec), n_items=len(items))
    key = hashlib.sha1(f"{os.path.abspath(manifest)}|{os.path.abspath(cfg.codec)}".encode()).hexdigest()[:10]
    path = os.path.join(cfg.cache_dir or os.path.join(cfg.run_dir, "tokens"),
                        f"{os.path.basename(manifest).split('.')[0]}-{key}.pt")
    if os.path.exists(path):
        try:
            old = torch_load(path, "token cache", mmap=True)["meta"]
            why = next((f"the {what} changed" for what, k in (("manifest or its audio files", "data"),
                                                              ("codec", "codec")) if old.get(k) != meta[k]), None)
        except (ValueError, KeyError, TypeError) as e:
            why = "damaged (its SHA-256 changed)" if ": damaged:" in str(e) else f"unreadable ({str(e)[:200]})"
        if why is None:
            return path
        if rank == 0:
            tqdm.write(f"token cache {path}: {why}; rebuilding it")
    index, codes, err = [], [], None
    for i in tqdm(range(rank, len(items), world), desc=f"cache tokens {os.path.basename(manifest)}", disable=rank != 0):
        it = items[i]
        try:
            wav = load_audio(it["path"], codec.sample_rate, it["offset"], it["duration"])  # (1, N)
        except Exception as e:
            if not cfg.skip_bad:
                err = f"{manifest} line {it['line']}: cannot decode {it['path']}: {e}"
                break
            continue
        with torch.no_grad():
            x = codec.encode(wav[None].to(device))[0]  # (K, T) of the whole item
        index.append(i)
        codes.append(x.to(torch.int16 if codec.cardinality < 2**15 else torch.int32).cpu())
    fail_together(err)
    if not all_reduce(torch.tensor(sum(x.shape[-1] > 0 for x in codes), device=device)).item():
        raise ManifestError(f"{manifest}: no usable items")
    try:
        atomic_save(dict(index=index, codes=codes), f"{path}.rank{rank}")
        err = None
    except OSError as e:  # disk full: every rank stops with it, not only the writer
        err = str(e)
    fail_together(err)
    if rank == 0:  # merge the ranks' parts, in manifest order
        got = {}
        for r in range(world):
            part = torch_load(f"{path}.rank{r}", "token cache part")
            got.update((i, x) for i, x in zip(part["index"], part["codes"]) if x.shape[-1] > 0)
            for name in (f"{path}.rank{r}", f"{path}.rank{r}.sha256"):
                os.remove(name)
        keep = sorted(got)
        try:
            atomic_save(dict(codes=torch.cat([got[i] for i in keep], dim=1), meta=meta,
                             offsets=torch.tensor([0] + list(np.cumsum([got[i].shape[-1] for i in keep]))),
                             texts=[items[i]["text"] for i in keep]), path)
        except OSError as e:
            err = str(e)
    fail_together(err)
    return path


def make_source(manifest, codec, cfg, seg_frames, random_crop, rank, world, device):
    """TokenSource of the token cache (cfg.cache_tokens) or AudioSource of the manifest; ValueError on bad data."""
    if cfg.cache_tokens:
        return TokenSource(cache_tokens(manifest, codec, cfg, rank, world, device), seg_frames, random_crop, cfg.seed)
    return AudioSource(manifest, codec, cfg, random_crop)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the toy sound-event set (wavs + JSONL manifests).")
    ap.add_argument("--root", default="data/toy", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="the set is a deterministic function of the seed")
    for k, v in DEFAULT_SIZES.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v, help=f"clips in the split (default {v})")
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = make_toy_dataset(args.root, args.seed, args.n_train, args.n_valid, args.n_test)
    for split, p in paths.items():
        print(f"{split}: {len(read_manifest(p)[0])} clips in {p}")
    print(f"made in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
