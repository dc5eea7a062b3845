"""The paper's blind pairwise listening test (Table 4; PAPER.md §4: 20 prompts, 8 raters, sound effects preferred
67 % to 33 % with RR, music 52 % to 48 %) as a local web page, with stored votes. The paper's §4.6 asks raters one
question: which sample has better quality and better matches the prompt.

    python listen.py prepare --a RUN_A --b RUN_B --out STUDY --manifest test.jsonl [--n 20] [--seed 0]
    python listen.py prepare --a-dir GEN_A/ --b-dir GEN_B/ --out STUDY [--prompts names.tsv]
    python listen.py serve STUDY [--port 8000] [--host 127.0.0.1] [--allow-tie]
    python listen.py report STUDY [--json report.json]

A study directory holds study.json (each trial's prompt and which file is system A, which B), the clips in audio/
and the votes in votes.sqlite. The page shows a rater the trials one at a time in an order shuffled per rater, the
two clips labelled only "1" and "2" (A is left for half of the trials, drawn per rater); the buttons enable once
both clips have been heard to the end. Each vote is committed at once, so a reload, or another day, resumes.
The server is stdlib only and binds to localhost by default; it has no login: anyone who reaches it can vote.
"""
import argparse
import contextlib
import datetime
import http.server
import json
import math
import os
import random
import re
import sqlite3
import threading
import urllib.parse

import soundfile as sf
import torch
from tqdm import tqdm

import data
import sample

QUESTION = "Which clip has better quality and better matches the description?"  # the paper's one question
AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac"}
MAX_BODY = 4096  # bytes of a vote request; a vote is ~60
MAX_RATER = 64   # characters of a rater id
Z95 = 1.959963984540054  # standard normal quantile 0.975


def fail(msg):
    raise SystemExit(f"listen.py: error: {msg}")


# ------------------------------------------------------------------------------------------------ statistics
def wilson_interval(k, n, z=Z95):
    """95 % Wilson score interval of a proportion k / n; (0, 1) when n is 0. Unlike p ± z·se it stays inside
    [0, 1] and keeps its coverage for small n and for shares near 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def sign_test_p(k, n):
    """Two-sided exact binomial test of k successes in n against p = 1/2 (the sign test): the probability of a
    split at least as uneven as k : n - k. Exact integer sums; 1.0 when n is 0."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2 ** n)


# ------------------------------------------------------------------------------------------------ prepare
def _read_prompt_lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--prompts {path}: cannot read it ({getattr(e, 'strerror', None) or e})")


def prompts_for_runs(args):
    """Distinct prompts, in file order, from --manifest (its captions) or --prompts (one per line)."""
    if args.manifest:
        try:
            items, _ = data.read_manifest(args.manifest)
        except data.ManifestError as e:
            fail(str(e))
        texts = [it["text"] for it in items]
    else:
        texts = [line.strip() for line in _read_prompt_lines(args.prompts) if line.strip()]
    return list(dict.fromkeys(texts))


def pairs_for_dirs(args):
    """[(name, prompt)] for the audio files present, by the same name, in --a-dir and --b-dir. The prompt of NAME
    is its line `NAME<TAB>prompt` in --prompts, else the text of NAME's stem + .txt beside it in --a-dir."""
    def audio(d):
        if not os.path.isdir(d):
            fail(f"{d}: not a directory")
        return {f for f in os.listdir(d) if os.path.splitext(f)[1].lower() in AUDIO_TYPES}
    a, b = audio(args.a_dir), audio(args.b_dir)
    for x, y, xd, yd in ((a, b, "--a-dir", "--b-dir"), (b, a, "--b-dir", "--a-dir")):
        if x - y:
            fail(f"{sorted(x - y)[0]} is in {xd} but not in {yd} ({len(x - y)} such file(s)); the two folders "
                 "need the same file names")
    if not a:
        fail(f"{args.a_dir}: no .wav or .flac files")
    given = {}
    if args.prompts:
        for i, line in enumerate(_read_prompt_lines(args.prompts), 1):
            if not line.strip():
                continue
            name, tab, text = line.partition("\t")
            if not tab or not text.strip():
                fail(f"--prompts {args.prompts} line {i}: expected `file name<TAB>prompt`, got {line[:60]!r}")
            if name not in a:
                fail(f"--prompts {args.prompts} line {i}: {name!r} is not an audio file of both folders")
            given[name] = text.strip()
    pairs = []
    for name in sorted(a):
        if name not in given:
            side = os.path.join(args.a_dir, os.path.splitext(name)[0] + ".txt")
            if not os.path.isfile(side):
                fail(f"no prompt for {name}: give --prompts FILE (lines `{name}<TAB>prompt`) or write {side}")
            with open(side, encoding="utf-8") as f:
                given[name] = f.read().strip()
            if not given[name]:
                fail(f"{side}: empty prompt")
        for d in (args.a_dir, args.b_dir):
            try:
                sf.info(os.path.join(d, name))
            except Exception as e:  # noqa: BLE001 -- any failure is the user's file: name it
                fail(f"{os.path.join(d, name)}: unreadable audio ({str(e).splitlines()[0][:200]})")
        pairs.append((name, given[name]))
    return pairs


def pick(items, n, seed):
    """n of items at random (seeded), kept in their order; all of them when there are no more than n."""
    if len(items) <= n:
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def system_names(args, a, b):
    if args.names:
        return args.names
    paths = [os.path.normpath(os.path.dirname(p) if os.path.isfile(p) else p) for p in (a, b)]  # RUN/lm.pt: RUN
    names = [os.path.basename(p) for p in paths]
    if names[0] == names[1]:
        names = paths
    return names if names[0] != names[1] else [f"{names[0]} (A)", f"{names[1]} (B)"]


def _write_wav(path, wav, sample_rate):
    w = wav / max(1.0, float(abs(wav).max()) / 0.99)  # scale down only if it would clip (as sample.py)
    data.atomic_write(path, lambda tmp: sf.write(tmp, w, sample_rate, subtype="PCM_16", format="WAV"))


def generate_clips(run, name, prompts, seeds, duration, out, key, device):
    """One clip per prompt from a run, with the run's own CFG coefficient and top-k; -> the sampling used."""
    try:
        defaults = sample.run_defaults(run)
        codec, t5, lm = sample.load_run(run, device)
        sample.num_frames_for(duration, codec.frame_rate, lm.cfg.max_frames)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    files = []
    for i, (prompt, seed) in enumerate(tqdm(list(zip(prompts, seeds)), desc=f"{key}: {name}", unit="clip")):
        # one call per prompt: a clip depends on its prompt and seed only, not on the other prompts of a batch
        wav = sample.generate_audio(codec, t5, lm, [prompt], duration, defaults["cfg_coef"], defaults["top_k"],
                                    seed=seed, progress=False)
        files.append(f"audio/{i:03d}_{key}.wav")
        _write_wav(os.path.join(out, files[-1]), wav[0, 0].float().cpu().numpy(), codec.sample_rate)
    return files, dict(duration=duration, cfg_coef=defaults["cfg_coef"], top_k=defaults["top_k"])


def prepare(args):
    runs, dirs = bool(args.a or args.b), bool(args.a_dir or args.b_dir)
    if runs == dirs or (runs and not (args.a and args.b)) or (dirs and not (args.a_dir and args.b_dir)):
        fail("give two runs (--a RUN_A --b RUN_B) or two folders of clips (--a-dir DIR_A --b-dir DIR_B)")
    if runs and bool(args.manifest) == bool(args.prompts):
        fail("with --a/--b give exactly one of --manifest M (its captions) or --prompts FILE (one per line)")
    if dirs and args.manifest:
        fail("--manifest is for --a/--b runs; with --a-dir/--b-dir the prompts come from --prompts FILE "
             "(lines `file name<TAB>prompt`) or NAME.txt files in --a-dir")
    if args.n < 1:
        fail(f"--n {args.n}: expected a number of trials >= 1")
    if args.duration is not None and not 0 < args.duration < math.inf:
        fail(f"--duration {args.duration}: expected a finite number of seconds > 0")
    if args.names and (len(set(args.names)) < 2 or not all(n.strip() for n in args.names)):
        fail(f"--names {args.names}: expected two different, non-empty names")
    for flag, path in (("--a", args.a), ("--b", args.b)):
        if path and not os.path.exists(path):
            fail(f"{flag} {path}: run not found")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device} but CUDA is not available")
    if args.threads < 0:
        fail(f"--threads {args.threads}: expected >= 0 (0: torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    study_json = os.path.join(args.out, "study.json")
    if os.path.exists(study_json):
        fail(f"{study_json} exists; choose another --out (the votes of a study refer to its trials)")
    names = system_names(args, *((args.a, args.b) if runs else (args.a_dir, args.b_dir)))
    if runs:
        prompts = pick(prompts_for_runs(args), args.n, args.seed)
        if not prompts:
            fail(f"{args.manifest or args.prompts}: no prompts in it")
        seeds = [args.seed + i for i in range(len(prompts))]  # the same seed for both runs, per prompt
        try:
            d_a, d_b = (sample.run_defaults(r)["duration"] for r in (args.a, args.b))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        duration = args.duration or min(d_a, d_b)  # equally long clips: the length must not give a system away
    else:
        pairs = pick(pairs_for_dirs(args), args.n, args.seed)
    try:
        os.makedirs(os.path.join(args.out, "audio"), exist_ok=True)
    except OSError as e:
        fail(f"--out {args.out}: cannot create the directory ({e.strerror or e})")
    if runs:
        files_a, samp_a = generate_clips(args.a, names[0], prompts, seeds, duration, args.out, "A", args.device)
        files_b, samp_b = generate_clips(args.b, names[1], prompts, seeds, duration, args.out, "B", args.device)
        trials = [dict(id=i, prompt=p, A=fa, B=fb, seed=s)
                  for i, (p, fa, fb, s) in enumerate(zip(prompts, files_a, files_b, seeds))]
        systems = dict(A=dict(name=names[0], run=os.path.abspath(args.a), sampling=samp_a),
                       B=dict(name=names[1], run=os.path.abspath(args.b), sampling=samp_b))
    else:
        trials = []
        for i, (name, prompt) in enumerate(tqdm(pairs, desc="copy clips", unit="pair")):
            ext = os.path.splitext(name)[1].lower()
            t = dict(id=i, prompt=prompt, file=name)
            for key, d in (("A", args.a_dir), ("B", args.b_dir)):
                t[key] = f"audio/{i:03d}_{key}{ext}"
                with open(os.path.join(d, name), "rb") as f:
                    data.atomic_write(os.path.join(args.out, t[key]), f.read())
            trials.append(t)
        systems = dict(A=dict(name=names[0], dir=os.path.abspath(args.a_dir)),
                       B=dict(name=names[1], dir=os.path.abspath(args.b_dir)))
    study = dict(format="listen.py study 1", created=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), seed=args.seed, question=QUESTION, systems=systems, trials=trials)
    data.atomic_write(study_json, json.dumps(study, indent=1, ensure_ascii=False) + "\n")  # last: marks it done
    print(f"wrote {study_json}: {len(trials)} trials, A = {names[0]}, B = {names[1]}")
    print(f"next: python listen.py serve {args.out}")


# ------------------------------------------------------------------------------------------------ the study
def load_study(study_dir):
    """study.json of a study directory, checked: trial ids unique integers, prompts strings, audio files inside
    the directory and present. The audio paths are resolved here, once: the server never builds one from a
    request."""
    path = os.path.join(study_dir, "study.json")
    if not os.path.isfile(path):
        fail(f"{path} not found (make a study with `python listen.py prepare`)")
    try:
        with open(path, encoding="utf-8") as f:
            study = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path}: not readable JSON ({e})")
    if not isinstance(study, dict) or not isinstance(study.get("trials"), list) or not study["trials"] or \
            not isinstance(study.get("systems"), dict) or set(study["systems"]) != {"A", "B"}:
        fail(f"{path}: expected an object with 'systems' A and B and a non-empty list 'trials'")
    root, audio, seen = os.path.realpath(study_dir), {}, set()
    for i, t in enumerate(study["trials"]):
        if not isinstance(t, dict) or type(t.get("id")) is not int or t["id"] in seen or \
                not isinstance(t.get("prompt"), str):
            fail(f"{path}: trial {i}: expected a unique integer 'id' and a string 'prompt', got {str(t)[:100]}")
        seen.add(t["id"])
        for key in ("A", "B"):
            rel = t.get(key)
            full = os.path.realpath(os.path.join(root, rel)) if isinstance(rel, str) else ""
            if not full.startswith(root + os.sep) or os.path.splitext(full)[1].lower() not in AUDIO_TYPES:
                fail(f"{path}: trial {t['id']}: '{key}' must be a .wav or .flac file inside the study, got {rel!r}")
            if not os.path.isfile(full):
                fail(f"{path}: trial {t['id']}: '{key}' file {rel} is missing")
            audio[t["id"], key] = full
    for key in ("A", "B"):
        name = study["systems"][key].get("name") if isinstance(study["systems"][key], dict) else None
        if not isinstance(name, str):
            fail(f"{path}: systems.{key} needs a string 'name'")
    study["audio"] = audio
    return study


def plan(study, rater):
    """The rater's trials in their order, each with the system on the left ("1"): a shuffle seeded by (study
    seed, rater), so a reload or a restarted server gives the same plan; A is on the left in half of the trials."""
    rng = random.Random(f"{study.get('seed', 0)}/{rater}")
    ids = [t["id"] for t in study["trials"]]
    rng.shuffle(ids)
    left = (["A", "B"] * len(ids))[:len(ids)]
    rng.shuffle(left)
    return list(zip(ids, left))


SCHEMA = """CREATE TABLE IF NOT EXISTS votes (
    rater TEXT NOT NULL,
    trial INTEGER NOT NULL,
    position INTEGER NOT NULL,                                -- the trial's place in this rater's order, from 1
    left_system TEXT NOT NULL CHECK (left_system IN ('A', 'B')),  -- the system of clip "1"
    choice TEXT NOT NULL CHECK (choice IN ('1', '2', 'tie')),     -- what the rater clicked
    preferred TEXT NOT NULL CHECK (preferred IN ('A', 'B', 'tie')),
    voted_at TEXT NOT NULL,                                   -- UTC, ISO 8601
    PRIMARY KEY (rater, trial))"""


@contextlib.contextmanager
def database(study_dir):
    db = sqlite3.connect(os.path.join(study_dir, "votes.sqlite"), timeout=30)
    try:
        db.execute(SCHEMA)
        yield db
    finally:
        db.close()


def read_votes(study_dir):
    """[(rater, trial, position, left_system, choice, preferred, voted_at)] in the order they were cast."""
    path = os.path.join(study_dir, "votes.sqlite")
    if not os.path.isfile(path):
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro",
                                                uri=True)) as db:
            return db.execute("SELECT rater, trial, position, left_system, choice, preferred, voted_at FROM votes "
                              "ORDER BY voted_at, rowid").fetchall()
    except sqlite3.DatabaseError as e:
        fail(f"{path}: not a votes database ({e})")


# ------------------------------------------------------------------------------------------------ serve
class BadRequest(Exception):
    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


def check_rater(value):
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(400, "'rater' must be a non-empty string")
    rater = value.strip()
    if len(rater) > MAX_RATER or any(not c.isprintable() for c in rater):
        raise BadRequest(400, f"'rater' must be at most {MAX_RATER} printable characters")
    return rater


def rater_state(study, db, rater, allow_tie):
    """What the page needs: the rater's next trial (None when done) and the progress."""
    done = {r[0] for r in db.execute("SELECT trial FROM votes WHERE rater = ?", (rater,))}
    prompts = {t["id"]: t["prompt"] for t in study["trials"]}
    todo = [tid for tid, _ in plan(study, rater) if tid not in done]
    n = len(study["trials"])
    trial = dict(id=todo[0], number=n - len(todo) + 1, prompt=prompts[todo[0]]) if todo else None
    return dict(rater=rater, n_trials=n, n_done=n - len(todo), trial=trial, allow_tie=allow_tie)


def make_server(study_dir, host="127.0.0.1", port=8000, allow_tie=False, log=None):
    """A ThreadingHTTPServer for the study (call serve_forever). Routes: GET / (the page), GET /api/state?rater=R,
    GET /api/audio?rater=R&trial=T&side=1|2, POST /api/vote {"rater", "trial", "choice": "1"|"2"|"tie"}.
    Anything else, or a bad value, is a 4xx with {"error": ...} and changes nothing."""
    study = load_study(study_dir)
    ids = {t["id"] for t in study["trials"]}
    lock = threading.Lock()  # one writer at a time: the already-voted check and the insert are one step
    with database(study_dir):  # created now, so that a bad directory fails before serving
        pass
    page = PAGE.replace("__QUESTION__", QUESTION).encode("utf-8")

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "listen.py"
        sys_version = ""
        timeout = 30  # seconds a silent client may hold a thread

        def log_message(self, *a):  # the default logs every request to stderr
            pass

        def send(self, status, body, ctype="application/json; charset=utf-8"):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def query(self, url, names):
            q = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            if set(q) - set(names) or any(len(v) > 1 for v in q.values()):
                raise BadRequest(400, f"expected the query parameters {', '.join(names)} once each")
            return {k: q.get(k, [None])[0] for k in names}

        def do_GET(self):
            try:
                url = urllib.parse.urlsplit(self.path)
                if url.path in ("/", "/index.html"):
                    return self.send(200, page, "text/html; charset=utf-8")
                if url.path == "/api/state":
                    rater = check_rater(self.query(url, ["rater"])["rater"])
                    with database(study_dir) as db:
                        return self.send(200, rater_state(study, db, rater, allow_tie))
                if url.path == "/api/audio":
                    q = self.query(url, ["rater", "trial", "side"])
                    rater, trial = check_rater(q["rater"]), self.trial_id(q["trial"])
                    if q["side"] not in ("1", "2"):
                        raise BadRequest(400, "'side' must be 1 or 2")
                    left = dict(plan(study, rater))[trial]
                    with database(study_dir) as db:  # a voted trial keeps the sides it was voted with
                        row = db.execute("SELECT left_system FROM votes WHERE rater = ? AND trial = ?",
                                         (rater, trial)).fetchone()
                    left = row[0] if row else left
                    system = left if q["side"] == "1" else "B" if left == "A" else "A"
                    path = study["audio"][trial, system]
                    with open(path, "rb") as f:
                        return self.send(200, f.read(), AUDIO_TYPES[os.path.splitext(path)[1].lower()])
                raise BadRequest(404, "no such page")
            except BadRequest as e:
                self.send(e.status, dict(error=str(e)))

        def trial_id(self, value):
            if not isinstance(value, (str, int)) or isinstance(value, bool) or \
                    (isinstance(value, str) and not re.fullmatch(r"-?[0-9]{1,9}", value)):
                raise BadRequest(400, f"'trial' must be an integer, got {str(value)[:40]!r}")
            if int(value) not in ids:
                raise BadRequest(404, f"no trial {int(value)} in this study")
            return int(value)

        def do_POST(self):
            try:
                if urllib.parse.urlsplit(self.path).path != "/api/vote":
                    raise BadRequest(404, "no such page")
                size = self.headers.get("Content-Length")
                if size is None:
                    raise BadRequest(411, "a vote needs a Content-Length")
                if not size.isdigit():
                    raise BadRequest(400, f"bad Content-Length {size[:20]!r}")
                if int(size) > MAX_BODY:
                    self.close_connection = True
                    self.connection.settimeout(0.5)
                    try:  # read what has arrived (up to 64 KiB), so that the client gets the reply, not a reset
                        self.rfile.read(min(int(size), 1 << 16))
                    except OSError:
                        pass
                    raise BadRequest(413, f"a vote is at most {MAX_BODY} bytes, this one {size}")
                try:
                    body = json.loads(self.rfile.read(int(size)).decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise BadRequest(400, "the body must be a JSON object") from None
                if not isinstance(body, dict) or set(body) != {"rater", "trial", "choice"}:
                    raise BadRequest(400, "a vote is a JSON object with exactly 'rater', 'trial' and 'choice'")
                rater, trial = check_rater(body["rater"]), self.trial_id(body["trial"])
                choices = ("1", "2", "tie") if allow_tie else ("1", "2")
                if body["choice"] not in choices:
                    raise BadRequest(400, f"'choice' must be one of {', '.join(choices)}, got {body['choice']!r}")
                order = plan(study, rater)
                position, left = next((i + 1, lt) for i, (tid, lt) in enumerate(order) if tid == trial)
                preferred = {"tie": "tie", "1": left, "2": "B" if left == "A" else "A"}[body["choice"]]
                now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
                with lock, database(study_dir) as db:
                    try:
                        db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   (rater, trial, position, left, body["choice"], preferred, now))
                    except sqlite3.IntegrityError:
                        raise BadRequest(409, f"rater {rater!r} has already voted on trial {trial}") from None
                    db.commit()
                    state = rater_state(study, db, rater, allow_tie)
                if log:
                    log(f"vote: rater {rater!r}, trial {trial} ({state['n_done']} of {state['n_trials']}): "
                        f"clip {body['choice']}")
                self.send(200, dict(ok=True, state=state))
            except BadRequest as e:
                self.send(e.status, dict(error=str(e)))

        def not_allowed(self):
            self.send(405, dict(error=f"method {self.command} not allowed"))

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = not_allowed

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.study = study
    return server


def serve(args):
    if not 0 <= args.port < 65536:
        fail(f"--port {args.port}: expected 0..65535")
    try:
        server = make_server(args.study, args.host, args.port, args.allow_tie, log=lambda m: print(m, flush=True))
    except sqlite3.Error as e:
        fail(f"{os.path.join(args.study, 'votes.sqlite')}: cannot open the votes database ({e})")
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})")
    host, port = server.server_address[:2]
    n = len(server.study["trials"])
    print(f"listening test {args.study}: {n} trials; open http://{host}:{port}/ (Ctrl-C stops; votes are saved "
          f"as they are cast in {os.path.join(args.study, 'votes.sqlite')})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this port can vote; there is no login", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------------------------------------ report
def summarize(study, votes, top=5):
    """The numbers of `report`: shares of the decisive votes with Wilson intervals, the sign test, ties, the
    left-clip rate (a position-bias check), per rater and per prompt."""
    names = {k: study["systems"][k]["name"] for k in ("A", "B")}
    count = lambda rows, s: sum(r[5] == s for r in rows)
    a, b, ties = count(votes, "A"), count(votes, "B"), count(votes, "tie")
    lo_a, hi_a = wilson_interval(a, a + b)
    lo_b, hi_b = wilson_interval(b, a + b)
    left = sum(r[4] == "1" for r in votes if r[5] != "tie")

    def breakdown(key_of):
        groups = {}
        for r in votes:
            groups.setdefault(key_of(r), []).append(r)
        return {k: dict(votes=len(rows), A=count(rows, "A"), B=count(rows, "B"), tie=count(rows, "tie"))
                for k, rows in groups.items()}
    prompts = {t["id"]: t["prompt"] for t in study["trials"]}
    per_prompt = [dict(trial=k, prompt=prompts.get(k, f"(trial {k}: not in study.json)"), **v)
                  for k, v in breakdown(lambda r: r[1]).items()]
    per_prompt.sort(key=lambda d: (-abs(d["A"] - d["B"]), d["trial"]))
    return dict(
        question=study.get("question", QUESTION), systems=names, votes=len(votes), decisive=a + b, ties=ties,
        raters=len({r[0] for r in votes}), trials=len(study["trials"]),
        A=dict(votes=a, share=a / (a + b) if a + b else None, ci95=[lo_a, hi_a]),
        B=dict(votes=b, share=b / (a + b) if a + b else None, ci95=[lo_b, hi_b]),
        sign_test_p=sign_test_p(a, a + b), left_chosen=left / (a + b) if a + b else None,
        per_rater=breakdown(lambda r: r[0]), per_prompt=per_prompt[:top] if top else per_prompt)


def render_report(s, study_dir):
    pct = lambda x: "–" if x is None else f"{100 * x:.1f} %"
    lines = [f"listening test {study_dir}: {s['votes']} votes from {s['raters']} rater(s) on {s['trials']} trials "
             f"({s['ties']} ties)", f"question: {s['question']}", "",
             "| system | preferred | share of decisive votes | 95 % CI (Wilson) |", "|---|---|---|---|"]
    for k in ("A", "B"):
        lo, hi = s[k]["ci95"]
        lines.append(f"| {k}: {s['systems'][k]} | {s[k]['votes']} | {pct(s[k]['share'])} | {pct(lo)} – {pct(hi)} |")
    lines += ["", f"two-sided exact binomial (sign) test against 50/50, ties left out: p = {s['sign_test_p']:.4g} "
                  f"({s['A']['votes']} : {s['B']['votes']})",
              f"clip 1 (left) was chosen in {pct(s['left_chosen'])} of the decisive votes (position bias check)",
              "The interval and the test count votes as independent; the same raters and prompts recur, so the "
              "real uncertainty is larger: see the rows below.", "",
              "| rater | votes | A | B | tie | A's share |", "|---|---|---|---|---|---|"]
    for rater, v in sorted(s["per_rater"].items()):
        lines.append(f"| {rater} | {v['votes']} | {v['A']} | {v['B']} | {v['tie']} | "
                     f"{pct(v['A'] / (v['A'] + v['B']) if v['A'] + v['B'] else None)} |")
    lines += ["", f"prompts where the systems differ most ({len(s['per_prompt'])} shown):", "",
              "| trial | prompt | A | B | tie |", "|---|---|---|---|---|"]
    for p in s["per_prompt"]:
        lines.append(f"| {p['trial']} | {p['prompt']} | {p['A']} | {p['B']} | {p['tie']} |")
    return "\n".join(lines)


def report(args):
    if args.top < 0:
        fail(f"--top {args.top}: expected a number >= 0")
    study = load_study(args.study)
    votes = read_votes(args.study)
    if not votes:
        print(f"listening test {args.study}: no votes yet")
    s = summarize(study, votes, args.top)
    if votes:
        print(render_report(s, args.study))
    if args.json:
        try:
            data.atomic_write(args.json, json.dumps(s, indent=1, ensure_ascii=False) + "\n")
        except OSError as e:
            fail(f"--json {args.json}: cannot write it ({e.strerror or e})")
        print(f"wrote {args.json}")


# ------------------------------------------------------------------------------------------------ the page
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Listening test</title>
<style>
 body { font: 16px/1.45 system-ui, sans-serif; background: #f3f4f6; color: #1f2937; margin: 0; }
 main { max-width: 720px; margin: 40px auto; background: #fff; border-radius: 10px; padding: 28px 32px;
        box-shadow: 0 1px 4px #0002; }
 h1 { font-size: 22px; margin: 0 0 6px; }
 .muted { color: #6b7280; font-size: 14px; }
 #progress { float: right; color: #6b7280; font-size: 14px; margin-top: 4px; }
 #prompt { font-size: 20px; background: #eef2ff; border-radius: 8px; padding: 14px 16px; margin: 14px 0 20px; }
 .players { display: flex; gap: 20px; }
 .player { flex: 1; border: 1px solid #d1d5db; border-radius: 8px; padding: 14px; text-align: center; }
 .player .label { font-size: 40px; font-weight: 700; }
 .bar { height: 6px; background: #e5e7eb; border-radius: 3px; margin: 12px 0 6px; overflow: hidden; }
 .bar div { height: 100%; width: 0; background: #6366f1; }
 .heard { font-size: 13px; color: #6b7280; min-height: 18px; }
 .heard.yes { color: #047857; }
 button { font: inherit; padding: 9px 18px; border-radius: 7px; border: 1px solid #6366f1; background: #fff;
          color: #3730a3; cursor: pointer; }
 button.primary { background: #4f46e5; color: #fff; }
 button:disabled { opacity: .4; cursor: default; }
 .votes { display: flex; gap: 12px; justify-content: center; margin-top: 22px; }
 #error { color: #b91c1c; margin-top: 14px; min-height: 20px; }
 input { font: inherit; padding: 8px 10px; border: 1px solid #9ca3af; border-radius: 7px; width: 220px; }
 [hidden] { display: none !important; }
</style></head>
<body><main>
<h1>Listening test</h1>
<section id="login">
 <p>Each trial shows a description and two short clips, <b>1</b> and <b>2</b>. Listen to both to the end, then
  answer: <b>__QUESTION__</b></p>
 <p class="muted">Your answers are saved as you go; come back with the same id to continue.</p>
 <form id="login-form"><input id="rater" placeholder="your rater id" autocomplete="off" maxlength="64" required>
  <button class="primary" id="start" type="submit">Start</button></form>
</section>
<section id="trial" hidden>
 <div id="progress"></div>
 <div class="muted">Rater <span id="who"></span> · <a href="#" id="switch">not you?</a></div>
 <div id="prompt"></div>
 <div class="players">
  <div class="player"><div class="label">1</div><div class="bar"><div id="bar1"></div></div>
   <button id="play1" disabled>Play</button><div class="heard" id="heard1"></div></div>
  <div class="player"><div class="label">2</div><div class="bar"><div id="bar2"></div></div>
   <button id="play2" disabled>Play</button><div class="heard" id="heard2"></div></div>
 </div>
 <p class="muted" style="text-align:center;margin:18px 0 0">__QUESTION__</p>
 <div class="votes"><button id="vote1" class="primary" disabled>1 is better</button>
  <button id="votetie" disabled hidden>No preference</button>
  <button id="vote2" class="primary" disabled>2 is better</button></div>
 <div class="muted" id="hint" style="text-align:center;margin-top:8px">The buttons enable once both clips have
  been played to the end.</div>
</section>
<section id="done" hidden><p id="done-text"></p></section>
<div id="error"></div>
</main>
<script>
"use strict";
const $ = id => document.getElementById(id);
let rater = null, state = null;
const players = {};
for (const side of ["1", "2"]) {
  const audio = new Audio(), p = {audio, heard: false, url: null};
  players[side] = p;
  audio.addEventListener("timeupdate", () => {
    $("bar" + side).style.width = (audio.duration ? 100 * audio.currentTime / audio.duration : 0) + "%"; });
  audio.addEventListener("play", () => { $("play" + side).textContent = "Pause"; });
  audio.addEventListener("pause", () => { $("play" + side).textContent = "Play"; });
  audio.addEventListener("ended", () => {
    p.heard = true; $("bar" + side).style.width = "100%"; $("play" + side).textContent = "Play again";
    $("heard" + side).textContent = "\\u2713 heard to the end"; $("heard" + side).className = "heard yes";
    enableVotes(); });
  $("play" + side).addEventListener("click", () => {
    const other = players[side === "1" ? "2" : "1"].audio;
    other.pause();  // one clip at a time
    if (audio.paused) { if (audio.ended) audio.currentTime = 0; audio.play().catch(e => showError(e.message)); }
    else audio.pause();
  });
}
function show(view) { for (const v of ["login", "trial", "done"]) $(v).hidden = v !== view; }
function showError(msg) { $("error").textContent = msg || ""; }
function voteButtons() { return [$("vote1"), $("vote2"), $("votetie")]; }
function enableVotes() {
  const ok = players["1"].heard && players["2"].heard;
  for (const b of voteButtons()) b.disabled = !ok;
  $("hint").hidden = ok;
}
async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({error: "bad reply from the server"}));
  if (!r.ok) { const e = new Error(body.error || r.statusText); e.status = r.status; throw e; }
  return body;
}
function q(params) { return new URLSearchParams(params).toString(); }
async function load() {
  try { render(await api("/api/state?" + q({rater}))); } catch (e) { showError(e.message); }
}
async function loadClip(side, trialId) {
  const p = players[side];
  const r = await fetch("/api/audio?" + q({rater, trial: trialId, side}));
  if (!r.ok) { showError("could not load clip " + side); return; }
  const blob = await r.blob();
  if (!state || !state.trial || state.trial.id !== trialId) return;  // the rater moved on meanwhile
  if (p.url) URL.revokeObjectURL(p.url);
  p.url = URL.createObjectURL(blob);
  p.audio.src = p.url;
  $("play" + side).disabled = false;
}
function render(s) {
  state = s; showError("");
  for (const p of Object.values(players)) { p.audio.pause(); p.heard = false; }
  $("who").textContent = s.rater;
  if (!s.trial) {
    show("done");
    $("done-text").textContent = "All " + s.n_trials + " trials done. Thank you!";
    return;
  }
  show("trial");
  $("progress").textContent = "trial " + s.trial.number + " of " + s.n_trials;
  $("prompt").textContent = s.trial.prompt;
  $("votetie").hidden = !s.allow_tie;
  for (const side of ["1", "2"]) {
    $("play" + side).disabled = true; $("play" + side).textContent = "Play";
    $("bar" + side).style.width = "0"; $("heard" + side).textContent = ""; $("heard" + side).className = "heard";
    loadClip(side, s.trial.id);
  }
  enableVotes();
}
async function vote(choice) {
  for (const b of voteButtons()) b.disabled = true;
  try {
    const r = await api("/api/vote", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({rater, trial: state.trial.id, choice})});
    render(r.state);
  } catch (e) {
    if (e.status === 409) load(); else { showError(e.message); enableVotes(); }
  }
}
$("vote1").addEventListener("click", () => vote("1"));
$("vote2").addEventListener("click", () => vote("2"));
$("votetie").addEventListener("click", () => vote("tie"));
$("login-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const id = $("rater").value.trim();
  if (!id) return;
  rater = id; location.hash = "rater=" + encodeURIComponent(id); load();
});
$("switch").addEventListener("click", ev => {
  ev.preventDefault(); rater = null; state = null;
  for (const p of Object.values(players)) p.audio.pause();
  history.replaceState(null, "", location.pathname); show("login");
});
const m = location.hash.match(/^#rater=(.+)$/);  // a reload (or a link with the id) resumes at once
if (m) { rater = decodeURIComponent(m[1]); load(); }
</script>
</body></html>
"""


# ------------------------------------------------------------------------------------------------ command line
def main(argv=None):
    ap = argparse.ArgumentParser(description="The paper's blind pairwise listening test (Table 4): prepare a study "
                                 "from two systems, serve it to raters as a web page, report the preference.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="generate (or copy) the clips of two systems and write STUDY/study.json",
                        description="Two train.py runs (--a/--b: one clip per prompt from each, with the same seed "
                        "and each run's own CFG coefficient and top-k) or two folders of clips made elsewhere "
                        "(--a-dir/--b-dir: .wav or .flac files with the same names in both).")
    pr.add_argument("--a", help="system A: a train.py run directory or its lm.pt")
    pr.add_argument("--b", help="system B: a train.py run directory or its lm.pt")
    pr.add_argument("--a-dir", help="system A: a folder of clips (instead of --a)")
    pr.add_argument("--b-dir", help="system B: a folder of clips with the same file names as --a-dir")
    pr.add_argument("--out", required=True, help="the study directory to write (must not hold a study.json)")
    pr.add_argument("--manifest", help="with --a/--b: take the prompts from this manifest's captions (JSONL, as "
                    "for training; its distinct 'text' values)")
    pr.add_argument("--prompts", help="with --a/--b: a text file, one prompt per line; with --a-dir/--b-dir: "
                    "lines `file name<TAB>prompt` (default there: the text of NAME.txt beside each clip in --a-dir)")
    pr.add_argument("--n", type=int, default=20, help="trials: prompts (or clip pairs) drawn at random when there "
                    "are more (default 20, as the paper)")
    pr.add_argument("--seed", type=int, default=0, help="draws the prompts; prompt i is generated with seed + i "
                    "by both runs; also seeds each rater's trial order")
    pr.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"),
                    help="names of the two systems in the report (default: the run or folder names)")
    pr.add_argument("--duration", type=float, help="seconds per clip (default: the runs' training segment, the "
                    "shorter if they differ, so that both systems' clips are equally long)")
    pr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    pr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is fastest for "
                    "toy runs on a busy machine)")
    sv = sub.add_parser("serve", help="serve the test page; votes go to STUDY/votes.sqlite",
                        description="Serve the listening test. Raters open the page, enter an id and vote; a reload "
                        "or a later visit with the same id resumes. Stop with Ctrl-C; votes are already saved.")
    sv.add_argument("study", help="the study directory (from prepare)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                    "0.0.0.0 lets others on the network vote, without any login)")
    sv.add_argument("--allow-tie", action="store_true", help="add a third button, 'No preference'")
    rp = sub.add_parser("report", help="print the preference table (shares, Wilson 95%% CIs, sign test)")
    rp.add_argument("study", help="the study directory")
    rp.add_argument("--json", help="also write the numbers to this JSON file")
    rp.add_argument("--top", type=int, default=5, help="prompts listed in the per-prompt table (0: all)")
    args = ap.parse_args(argv)
    try:
        {"prepare": prepare, "serve": serve, "report": report}[args.cmd](args)
    except OSError as e:  # a failed write (data.atomic_write names the file), a full disk
        fail(str(e))


if __name__ == "__main__":
    main()
