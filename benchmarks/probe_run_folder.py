"""A hostile probe of the `mlrg` command line on one run folder (the cases of issue 19), run again on demand.

In a temporary folder: two tiny studies started together into one run folder (one must be refused; while the other
pretrains, `mlrg pretrain` into its folder must be refused too); then the study again with another stage-1 seed,
killed with SIGKILL (the study process alone) mid-pretraining and started again. On that run's files: Latin-1 / UTF-16
/ UTF-8-with-BOM annotations to pretrain, finetune and generate; outputs on a full 1 MiB tmpfs and into a read-only
tmpfs; mimic presets refused; `mlrg finetune` into a folder another process holds; `mlrg report` against `mlrg
generate` for a test sample; a rerun of stage 2 that fails; no empty set-aside folder. It prints one line per case
(case, ok / NOT OK, exit status, seconds, the command shortened, the key line of its output, what was expected) and
saves them as JSON to benchmarks/results/probe_run_folder.json; whether a case is ok is computed from what was
observed. Mounting a tmpfs needs root; without it those cases are skipped with the reason. 6 to 10 minutes on one
busy core.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_run_folder.py [--keep DIR]

--keep DIR: run in DIR (created; must be empty) and keep it afterwards; otherwise a temporary folder is removed.
"""

import argparse
import codecs
import csv
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlrg.core import save_json
from mlrg.runs import lock_holder, processes_below, running

MLRG = [sys.executable, "-c", "import sys; from mlrg.runs import main; sys.exit(main(sys.argv[1:]))"]
TINY = ["-p", "num_threads", "1", "-p", "pretrain.max_steps", "12", "-p", "pretrain.save_steps", "1"]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
}
ROWS = []
T = RUN = None  # the probe's folder and the run folder in it


# ------------------------------------------------------------------------------------------------ helpers
def short(cmd) -> str:
    "The command as one short line: `mlrg` for the interpreter, $T for the probe folder, $TINY for the tiny -p's."
    words = ["mlrg", *map(str, cmd[len(MLRG) :])] if list(cmd[: len(MLRG)]) == MLRG else list(map(str, cmd))
    s = shlex.join(words).replace(shlex.join(TINY), "$TINY").replace(str(T), "$T")
    return s if len(s) <= 110 else s[:107] + "..."


class Result:
    def __init__(self, cmd, rc, out, err, seconds):
        self.cmd, self.rc, self.out, self.err, self.seconds = cmd, rc, out, err, seconds

    @property
    def err_lines(self):
        return [line for line in self.err.splitlines() if line.strip()]

    def key(self, *patterns) -> str:
        "The first line matching one of `patterns` (stderr, then stdout), else stderr's last line, else stdout's."
        lines = [ln.strip() for ln in (self.err + "\n" + self.out).splitlines() if ln.strip()]
        for pat in patterns:
            for ln in lines:
                if re.search(pat, ln):
                    return ln
        return (self.err_lines or lines or [""])[-1].strip()


def _text(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else (x or "")


def mlrg(*args, timeout=300) -> Result:
    "Run `mlrg ARGS` in the probe folder; its exit status ('timeout' when it ran past `timeout`), output, seconds."
    cmd = [*MLRG, *map(str, args)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=T, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", _text(e.stdout), _text(e.stderr)
    return Result(cmd, rc, out, err, time.perf_counter() - t0)


def record(case, cmd, rc, key, expected, ok, seconds=None, **extra):
    "One case: printed as one line and kept for the JSON."
    row = {
        "case": case,
        "ok": "ok" if ok else "NOT OK",
        "rc": rc,
        "seconds": None if seconds is None else round(seconds, 1),
        "command": short(cmd) if cmd else "",
        "key": key.strip(),
        "expected": expected,
        **extra,
    }
    ROWS.append(row)
    secs = "" if seconds is None else f"{seconds:5.1f}s"
    key = row["key"] if len(row["key"]) <= 240 else row["key"][:237] + "..."
    print(
        f"{case:<26} | {row['ok']:<6} | rc {rc!s:<3} | {secs:>6} | {row['command']} | {key} | expected: {expected}",
        flush=True,
    )
    return row


def skip(case, why, expected=""):
    row = {"case": case, "ok": "skipped", "rc": None, "seconds": None, "command": "", "key": why, "expected": expected}
    ROWS.append(row)
    print(f"{case:<26} | skipped | {why}", flush=True)


def one_error_line(r: Result, prog=None, alone=True) -> bool:
    """Exactly one error line (`<prog>: error: ...`) on standard error and no traceback; `alone`: and nothing else
    there (a stage that trained before failing logs its progress there too)."""
    head = re.escape(prog) if prog else r"[\w. ]+"
    errors = [ln for ln in r.err_lines if re.match(head + ": error: ", ln)]
    return len(errors) == 1 and "Traceback" not in r.err and (not alone or len(r.err_lines) == 1)


def cli_args(params: dict, **override) -> list:
    "`--key value` for each parameter of a stage's params.json (None left out), with `override`."
    out = []
    for k, v in {**params, **override}.items():
        if v is None:
            continue
        v = json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)
        out += [f"--{k}", v]
    return out


def train_steps(path) -> list:
    "The step of each train record of a metrics.jsonl."
    if not Path(path).is_file():
        return []
    recs = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [r.get("step") for r in recs if r.get("kind") == "train"]


def duplicates(steps) -> list:
    return sorted({s for s in steps if steps.count(s) > 1})


def cmdline(pid) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def study_cmd(*extra) -> list:
    return [*MLRG, "study", "--preset", "tiny", "--run", str(RUN), *TINY, *extra]


def start(cmd, log: Path, err: Path | None = None):
    "Start `cmd` in its own session, standard output (and error, unless `err`) streamed into `log`."
    out = open(log, "w")
    proc = subprocess.Popen(
        cmd,
        cwd=T,
        env=ENV,
        stdout=out,
        stderr=open(err, "w") if err else subprocess.STDOUT,
        start_new_session=True,
    )
    proc.cmd, proc.log, proc.t0 = cmd, log, time.perf_counter()
    return proc


def wait_for(cond, timeout, proc=None, every=0.1) -> bool:
    "Wait until `cond()` (False after `timeout` seconds, or once `proc` has ended without it)."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(cond())
        time.sleep(every)
    return False


def said(log_text) -> dict:
    "{step: what the study first said of it} from its '[i/n] step ...' lines."
    out = {}
    for m in re.finditer(r"^\[\d+/\d+\] (\S+)\s+(.*)$", log_text, re.MULTILINE):
        out.setdefault(m.group(1), m.group(2))
    return out


def mount_tmpfs(folder: Path, options: str):
    "None once a tmpfs is mounted on `folder`, else why not."
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return f"cannot mount a tmpfs here: {r.stderr.strip()}" if r.returncode else None


def fill(folder: Path) -> int:
    "Fill the file system of `folder` with one file until it is full; the bytes written."
    n = 0
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            while True:
                try:
                    f.write(b"\0" * chunk)
                    n += chunk
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return n


def empty(folder: Path):
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ------------------------------------------------------------------------------------------------ the cases
def studies_together():
    """Case 1 (two studies into one folder at once), 10a (a second writer into the pretraining folder while the study
    trains) and 9 (the study's streamed log)."""
    a = start(study_cmd(), T / "study1a.log", T / "study1a.err")
    b = start(study_cmd(), T / "study1b.log", T / "study1b.err")
    procs = {a.pid: a, b.pid: b}
    wait_for(lambda: any(p.poll() is not None for p in procs.values()), 300)
    ended = [p for p in procs.values() if p.poll() is not None]
    loser = ended[0] if ended else None
    winner = next((p for p in procs.values() if p is not loser), a)
    loser_secs = time.perf_counter() - loser.t0 if loser else None

    # 10a: while the winner pretrains, `mlrg pretrain` with the study's own parameters into the same folder; the
    # holder (the stage's kernel) is paused (SIGSTOP) meanwhile, so that its 12 short steps cannot end first
    pt = RUN / "pretrain"
    holder = {}
    wait_for(lambda: holder.update(lock_holder(pt) or {}) or isinstance(holder.get("pid"), int), 400, winner, 0.02)
    pid = holder.get("pid")
    paused = isinstance(pid, int) and running(pid)
    if paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        still = lock_holder(pt) if paused else None
        if still and still.get("pid") == pid:
            params = json.loads((RUN / "study" / "pretrain.params.json").read_text())
            r = mlrg("pretrain", *cli_args(params, progress=False), timeout=240)
            line = r.key(r"error:")
            record(
                "10a pretrain folder in use",
                r.cmd,
                r.rc,
                line,
                f"rc 2, one line naming {short([pt])} and its holder, process {pid} (the study's kernel, paused "
                "meanwhile)",
                r.rc == 2 and one_error_line(r, "mlrg.pretrain") and f"{pt}:" in line and f"process {pid} " in line,
                r.seconds,
                holder=holder,
                holder_cmd=cmdline(pid),
                stderr_lines=len(r.err_lines),
            )
        else:
            skip("10a pretrain folder in use", f"the study's pretraining was not caught holding its folder ({holder})")
    finally:
        if paused:
            os.kill(pid, signal.SIGCONT)

    winner.wait(timeout=600)
    wsecs = time.perf_counter() - winner.t0
    win_log = winner.log.read_text() + (T / f"study1{'a' if winner is a else 'b'}.err").read_text()
    if loser is not None:
        l_out = loser.log.read_text()
        l_err = (T / f"study1{'a' if loser is a else 'b'}.err").read_text()
        r = Result(loser.cmd, loser.returncode, l_out, l_err, loser_secs)
        line = r.key(r"error:")
        ok = (
            r.rc == 2
            and one_error_line(r, "mlrg study")
            and f"in use by process {winner.pid} " in line
            and str(RUN) in line
            and "[1/" not in l_out
        )
        record(
            "1 second study refused",
            r.cmd,
            r.rc,
            line,
            f"rc 2 at once, one line naming {RUN} and the first study, process {winner.pid}; no stage started",
            ok,
            r.seconds,
            first_pid=winner.pid,
            second_pid=loser.pid,
        )
    else:
        skip("1 second study refused", "neither study ended while the other ran (both ran on?)")
    pre, fin = train_steps(RUN / "pretrain" / "metrics.jsonl"), train_steps(RUN / "finetune" / "metrics.jsonl")
    dup = {"pretrain": duplicates(pre), "finetune": duplicates(fin)}
    last = [ln for ln in win_log.splitlines() if ln.startswith("mlrg study:")] or win_log.strip().splitlines() or [""]
    record(
        "1 first study finishes",
        winner.cmd,
        winner.returncode,
        last[-1] + f" | train steps: pretrain {len(pre)}, finetune {len(fin)}; repeated: {dup}",
        "rc 0; pretrain/ and finetune/metrics.jsonl: no train step twice",
        winner.returncode == 0 and pre and fin and not dup["pretrain"] and not dup["finetune"],
        wsecs,
        pretrain_steps=pre,
        finetune_steps=fin,
    )
    check_log("9 log: study 1", winner.cmd, win_log, r"^train: .*\b12/12\b")


def check_log(case, cmd, text, progress):
    "Case 9: a streamed study log: no cursor codes, carriage returns or TCP warning; progress as plain lines."
    bad = [what for what, s in (("cursor codes", "\x1b["), ("carriage returns", "\r")) if s in text]
    bad += ["'without encryption'"] if "without encryption" in text else []
    m = re.search(progress, text, re.MULTILINE)
    key = (m.group(0) if m else f"no line matching {progress!r}") + (f"; found {', '.join(bad)}" if bad else "")
    record(
        case,
        cmd,
        "-",
        key,
        f"no \\x1b[, no \\r, no 'without encryption'; a progress line matching {progress!r}",
        not bad and m is not None,
        lines=text.count("\n"),
    )


def killed_study():
    """Case 2: the study again with another stage-1 seed (so it reruns pretraining), killed with SIGKILL (the study
    process alone) at its second checkpoint; then the same command again."""
    extra = ["-p", "pretrain.seed", "1"]
    t_start = time.time()
    proc = start(study_cmd(*extra), T / "study2a.log")
    pt = RUN / "pretrain"

    def two_new_checkpoints():
        if "running nbs/03_pretrain.ipynb" not in proc.log.read_text():
            return False
        return len([p for p in pt.glob("step_*.pt") if p.stat().st_mtime >= t_start]) >= 2

    if not wait_for(two_new_checkpoints, 400, proc) or proc.poll() is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        record(
            "2 kill -9 mid-pretraining",
            proc.cmd,
            proc.returncode,
            (proc.log.read_text().strip().splitlines() or [""])[-1],
            "the study still pretraining at its second checkpoint",
            False,
        )
        return
    kids = processes_below(proc.pid)
    names = {k: cmdline(k) for k in kids}
    at_kill = sorted((p.name for p in pt.glob("step_*.pt")), key=lambda n: int(re.sub(r"\D", "", n) or 0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    wait_for(lambda: not any(running(k) for k in kids), 30)
    gone = time.monotonic() - t0
    orphans = [k for k in kids if running(k)]
    for k in orphans:
        os.kill(k, signal.SIGKILL)
    kinds = sorted({"execute_stage" if "execute_stage" in n else "ipykernel" if "ipykernel" in n else n[:40]
                    for n in names.values()})
    record(
        "2 descendants end",
        proc.cmd,
        proc.returncode,
        f"{len(kids)} descendants ({', '.join(kinds)}) at {at_kill[-2:]}; "
        + (f"all gone {gone:.1f} s after the kill" if not orphans else f"still alive after 30 s: {orphans}"),
        "the stage's papermill (execute_stage) and its ipykernel end within a few seconds (<= 10 s) of the kill",
        bool(kids) and not orphans and gone <= 10 and any("execute_stage" in n for n in names.values())
        and any("ipykernel" in n for n in names.values()),
        gone,
        descendants=names,
    )
    log_a = proc.log.read_text()
    check_log("9 log: study 2 killed", proc.cmd, log_a, r"^train: .*\b\d+/12\b")

    again = start(study_cmd(*extra), T / "study2b.log")
    again.wait(timeout=600)
    log_b = again.log.read_text()
    s = said(log_b)
    took = next((ln for ln in log_b.splitlines() if "took over the lock" in ln), "")
    nb = RUN / "reports" / "03_pretrain.ipynb"
    resumed = re.search(r"resumed from \S+ at step (\d+)", nb.read_text()) if nb.is_file() else None
    pre, fin = train_steps(pt / "metrics.jsonl"), train_steps(RUN / "finetune" / "metrics.jsonl")
    dup = {"pretrain": duplicates(pre), "finetune": duplicates(fin)}
    skipped = [k for k in ("phantom", "prepare", "label") if "skipped" in s.get(k, "")]
    record(
        "2 same command again",
        again.cmd,
        again.returncode,
        (took or "no 'took over the lock' line")
        + f" | pretrain: {s.get('pretrain', '?')} | "
        + (resumed.group(0) if resumed else "no 'resumed from' in 03_pretrain.ipynb")
        + f" | pretrain steps {len(pre)}, repeated {dup}",
        "rc 0; says it took over the lock; phantom/prepare/label skipped; pretrain 'continuing' and resumed from a "
        "checkpoint; no train step twice in pretrain/ or finetune/metrics.jsonl",
        again.returncode == 0
        and bool(took)
        and len(skipped) == 3
        and s.get("pretrain", "").startswith("continuing")
        and resumed is not None
        and 1 <= int(resumed.group(1)) < 12
        and pre[-1:] == [12]
        and not dup["pretrain"]
        and not dup["finetune"],
        time.perf_counter() - again.t0,
        said=s,
        pretrain_steps=pre,
    )
    check_log("9 log: study 2 again", again.cmd, log_b, r"^train: .*\b12/12\b")


def encodings():
    "Case 3: an annotation in Latin-1, UTF-16 or UTF-8 with a byte-order mark, to pretrain, finetune and generate."
    enc = T / "enc"
    enc.mkdir()
    data = json.loads((RUN / "prepared" / "annotation.json").read_text(encoding="utf-8"))
    data["train"][0]["findings"] += " Caf\u00e9 au lait spots."  # a character Latin-1 writes as one byte
    text = json.dumps(data, ensure_ascii=False)
    files = {
        "latin1": text.encode("latin-1"),
        "utf16": text.encode("utf-16"),
        "bom": codecs.BOM_UTF8 + text.encode("utf-8"),
    }
    for k, b in files.items():
        (enc / f"{k}.json").write_bytes(b)
    images = RUN / "mimic" / "files"
    best = RUN / "finetune" / "best.pt"
    for kind in ("latin1", "utf16"):
        x = enc / f"{kind}.json"
        runs = [
            ("pretrain", ["--data_path", x, "--image_root", images, "--model_save_path", enc / f"pt-{kind}"]),
            ("finetune", ["--data_path", x, "--image_root", images, "--model_save_path", enc / f"ft-{kind}"]),
            ("generate", ["--checkpoint", best, "--annotation", x, "--image_root", images, "--out",
                          enc / f"gen-{kind}.json", "--quiet"]),
        ]
        for stage, args in runs:
            extra = ["--num_threads", "1", "--progress", "false"] if stage != "generate" else []
            r = mlrg(stage, *args, *extra, timeout=240)
            line = r.key(r"error:")
            record(
                f"3 {kind} -> {stage}",
                r.cmd,
                r.rc,
                line,
                "rc 2, one line naming the file and saying UTF-8 is expected",
                r.rc == 2 and one_error_line(r) and f"{x}:" in line and "expected UTF-8" in line,
                r.seconds,
            )
    out = enc / "gen-bom.json"
    r = mlrg("generate", "--checkpoint", best, "--annotation", enc / "bom.json", "--image_root", images,
             "--out", out, "--quiet", timeout=300)
    n = len(json.loads(out.read_text(encoding="utf-8"))) if out.is_file() else 0
    record(
        "3 utf-8 BOM -> generate",
        r.cmd,
        r.rc,
        r.key(r"^generate:", r"error:") + f" ({n} records in the output)",
        f"rc 0; the test split written ({len(data['test'])} samples)",
        r.rc == 0 and n == len(data["test"]),
        r.seconds,
    )


def io_inputs():
    "Predictions, references and a reports CSV from the run's test predictions (inputs of evaluate and label)."
    io = T / "io"
    io.mkdir(exist_ok=True)
    recs = json.loads((RUN / "finetune" / "test_predictions.json").read_text(encoding="utf-8"))
    (io / "pred.json").write_text(json.dumps({r["id"]: r["generated"] for r in recs}), encoding="utf-8")
    (io / "gt.json").write_text(json.dumps({r["id"]: r["reference"] for r in recs}), encoding="utf-8")
    with open(io / "reports.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "Report"])
        w.writerows([r["id"], r["reference"]] for r in recs)
    return io


def full_disk(io):
    "Case 4: outputs on a real, full 1 MiB tmpfs."
    small = T / "small"
    why = mount_tmpfs(small, "size=1m")
    names = ["4 full disk: finetune", "4 full disk: generate", "4 full disk: evaluate", "4 full disk: label",
             "4 full disk: prepare"]
    if why:
        for n in names:
            skip(n, why)
        return
    try:
        ck = RUN / "finetune" / "last.pt"
        ck_size = ck.stat().st_size if ck.is_file() else 0
        params = json.loads((RUN / "study" / "finetune.params.json").read_text())
        runs = [
            (names[0], ck_size < 2**20,
             ["finetune", *cli_args(params, model_save_path=small / "ft", max_steps=2, progress=False)]),
            (names[1], True, ["generate", "--checkpoint", RUN / "finetune" / "best.pt", "--annotation",
                              RUN / "prepared" / "annotation.json", "--out", small / "preds.json", "--quiet"]),
            (names[2], True, ["evaluate", "--pred", io / "pred.json", "--gt", io / "gt.json", "--no-meteor",
                              "--out", small / "metrics.json"]),
            (names[3], True, ["label", "--in", io / "reports.csv", "--out", small / "labels.csv"]),
            (names[4], True, ["prepare", "--mimic-root", RUN / "mimic", "--out", small / "prepared" / "annotation.json",
                              "--quiet"]),
        ]
        for case, filled, args in runs:
            empty(small)
            n = fill(small) if filled else 0
            r = mlrg(*args, timeout=300)
            line = r.key(r"error:")
            how = f"the tmpfs filled first ({n} bytes)" if filled else f"empty tmpfs; a checkpoint: {ck_size} bytes"
            left = sorted(str(p.relative_to(small)) for p in small.rglob("*") if p.name != "filler")
            temp = [n for n in left if n.endswith(".tmp")]
            record(
                case,
                r.cmd,
                r.rc,
                line + (f" | temporary files left: {temp}" if temp else ""),
                f"rc 2, one error line naming a path under $T/small and 'No space left on device'; no temporary file "
                f"left ({how})",
                r.rc == 2
                and one_error_line(r, alone=not case.endswith("finetune"))
                and f"{small}/" in line
                and "No space left on device" in line
                and not temp,
                r.seconds,
                left=left,
                stderr_lines=len(r.err_lines),
            )
    finally:
        subprocess.run(["umount", str(small)], check=False)


def read_only(io):
    "Case 5: evaluate and label into a read-only folder (a read-only tmpfs: root ignores permissions)."
    ro = T / "ro"
    why = mount_tmpfs(ro, "ro,size=64k")
    if why:
        skip("5 read-only: evaluate", why)
        skip("5 read-only: label", why)
        return
    try:
        for case, out, args in [
            ("5 read-only: evaluate", ro / "out" / "m.json",
             ["evaluate", "--pred", io / "pred.json", "--gt", io / "gt.json", "--no-meteor"]),
            ("5 read-only: label", ro / "labels.csv", ["label", "--in", io / "reports.csv"]),
        ]:
            r = mlrg(*args, "--out", out, timeout=300)
            line = r.key(r"error:")
            m = re.search(r"error: (.+?): ", line)
            named = m.group(1) if m else ""
            ok = r.rc == 2 and one_error_line(r) and named == str(out.parent) and r.seconds < 10
            record(
                case,
                r.cmd,
                r.rc,
                line,
                f"rc 2 at once (< 10 s with the start), one line naming the folder {short([out.parent])}, "
                "not a temporary file",
                ok,
                r.seconds,
                named=named,
            )
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def refused_presets():
    "Case 8: a mimic study refused at the start leaves no run folder."
    from mlrg.study import STUDY_PRESETS

    new = T / "new-mimic"
    required = [k for k in STUDY_PRESETS["mimic"]["required"] if k != "study.mimic_root"]
    for case, extra in [
        ("8 preset missing -p", []),
        ("8 mimic_root missing", ["-p", "study.mimic_root", "/nonexistent"]
         + [a for k in required for a in ("-p", k, str(T / "none"))]
         + ["-p", "finetune.select_metric", "bleu4+ce14"]),  # rcb needs CheXbert / RadGraph weights
    ]:
        r = mlrg("study", "--preset", "mimic", "--run", new, *extra, timeout=120)
        names = "study.mimic_root" if not extra else "/nonexistent"
        line = r.key(r"error:")
        record(
            case,
            r.cmd,
            r.rc,
            line,
            f"rc 2, one error line naming {names}; {short([new])} does not exist",
            r.rc == 2 and one_error_line(r, "mlrg study") and names in line and not new.exists(),
            r.seconds,
            run_folder_exists=new.exists(),
        )


def second_writer():
    "Case 10b: `mlrg finetune --run_dir RUN` while another process holds the finetune folder's lock."
    ft = RUN / "finetune"
    code = (
        "import sys, time\nfrom mlrg.runs import folder_lock\n"
        "with folder_lock(sys.argv[1], 'finetune output folder'):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    helper = subprocess.Popen([sys.executable, "-c", code, str(ft)], cwd=T, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        if helper.stdout.readline().strip() != "held":
            skip("10b finetune folder in use", "the helper did not take the lock")
            return
        params = json.loads((RUN / "study" / "finetune.params.json").read_text())
        r = mlrg("finetune", *cli_args(params, progress=False), timeout=300)
        line = r.key(r"error:")
        record(
            "10b finetune folder in use",
            r.cmd,
            r.rc,
            line,
            f"rc 2, one line naming {short([ft])} and the holder, process {helper.pid}",
            r.rc == 2 and one_error_line(r) and f"{ft}:" in line and f"process {helper.pid} " in line,
            r.seconds,
        )
    finally:
        helper.terminate()
        helper.wait()


def report_vs_generate():
    """Case 11: `mlrg report` on a test sample's image files writes the findings (and sees the prompt) `mlrg generate`
    writes for it; the sample: one with a prior and other views whose generated findings are the rarest of the split
    (a tiny model writes few distinct reports)."""
    from collections import Counter

    from mlrg.data import image_slots

    ann = RUN / "prepared" / "annotation.json"
    best = RUN / "finetune" / "best.pt"
    data = json.loads(ann.read_text(encoding="utf-8"))
    summary = json.loads((RUN / "finetune" / "finetune_summary.json").read_text(encoding="utf-8"))
    max_views = summary["params"].get("max_views") or 3
    image_root = Path(summary["params"].get("image_root") or RUN / "mimic" / "files")
    out = T / "gen11.json"
    g = mlrg("generate", "--checkpoint", best, "--annotation", ann, "--image_root", image_root, "--out", out,
             "--quiet", timeout=300)
    recs = {str(x["id"]): x for x in json.loads(out.read_text(encoding="utf-8"))} if out.is_file() else {}
    count = Counter(x["generated"] for x in recs.values())
    test = [it for it in data["test"] if str(it["id"]) in recs] or data["test"]
    item = min(
        test,
        key=lambda it: (
            not it.get("prior_study"),
            not it["auxiliary_references"]["image_path"],
            count.get(recs.get(str(it["id"]), {}).get("generated"), 0),
        ),
    )
    slots = image_slots(item, max_views)
    args = ["report", "--checkpoint", best]
    for _, p, view, t in slots:
        if t == 0:
            args += ["--image", image_root / p, "--view", view or "UNK"]
    if item.get("prior_study"):
        ls = item["prior_study"]["latest_study"]
        args += ["--prior-image", image_root / ls["image_path"], "--prior-view", ls.get("view_position") or "UNK"]
        if ls.get("findings"):
            args += ["--prior-findings", ls["findings"]]
    if item.get("indication"):
        args += ["--indication", item["indication"]]
    r = mlrg(*args, "--json", timeout=300)
    try:
        rep = json.loads(r.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        rep = {}
    want = recs.get(str(item["id"]), {})
    found, prompt = rep.get("findings"), (rep.get("prompt") or {}).get("text")
    same = found is not None and found == want.get("generated")
    same_prompt = prompt is not None and prompt == want.get("prompt")
    record(
        "11 report = generate",
        r.cmd,
        r.rc,
        (f"findings equal: {same}, prompt equal: {same_prompt} | report: {found!r} | generate (rc {g.rc}): "
         f"{want.get('generated')!r} ({count.get(want.get('generated'), 0)} of {len(recs)} test reports read so)")
        if r.rc == 0
        else r.key(r"error:"),
        f"rc 0; mlrg report's findings and prompt for test sample {item['id']} ({len(slots)} images"
        f"{', with a prior' if item.get('prior_study') else ''}) equal mlrg generate's",
        r.rc == 0 and g.rc == 0 and same and same_prompt,
        r.seconds,
        sample=item["id"],
        report_prompt=prompt,
        generate_prompt=want.get("prompt"),
        generate_seconds=round(g.seconds, 1),
    )


def failed_rerun():
    "Case 6: a rerun of stage 2 that fails keeps the executed notebook of the run before it beside its own."
    from mlrg.study import failed_cell

    reports = RUN / "reports"
    before = set(reports.glob("04_finetune.replaced-*.ipynb"))
    r = mlrg("study", "--preset", "tiny", "--run", RUN, *TINY, "-p", "pretrain.seed", "1",
             "-p", "finetune.max_steps", "2", "-p", "finetune.pretrained_path", RUN / "none.pt", timeout=600)
    new = sorted(set(reports.glob("04_finetune.replaced-*.ipynb")) - before)
    cur = reports / "04_finetune.ipynb"
    good = [p for p in new if not failed_cell(p)]
    s = said(r.out)
    record(
        "6 failed rerun keeps report",
        r.cmd,
        r.rc,
        r.key(r"stopped:", r"error:")
        + f" | set aside: {[p.name for p in new]}; 04_finetune.ipynb failed in: {failed_cell(cur) or 'nothing'}",
        "rc 1; stages before finetune skipped; the previous good 04_finetune.ipynb set aside as "
        "04_finetune.replaced-*.ipynb (with its .html) beside the failed 04_finetune.ipynb",
        r.rc == 1
        and all("skipped" in s.get(k, "") for k in ("phantom", "prepare", "label", "pretrain"))
        and len(good) == 1
        and good[0].with_suffix(".html").is_file()
        and bool(failed_cell(cur)),
        r.seconds,
        said=s,
    )


def no_empty_aside():
    "Case 7: no empty `*.replaced-*` folder anywhere in the run folder."
    aside = [p for p in RUN.rglob("*.replaced-*") if p.is_dir()]
    bad = [p for p in aside if all(q.name == ".mlrg.lock" for q in p.iterdir())]
    record(
        "7 no empty set-aside dirs",
        None,
        "-",
        f"{len(aside)} set-aside folders: {[p.name for p in aside]}; empty: {[str(p) for p in bad]}",
        "no *.replaced-* folder that is empty (or holds only .mlrg.lock)",
        not bad,
    )


# ------------------------------------------------------------------------------------------------ main
def main():
    global T, RUN
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", help="run in this folder (created, must be empty) and keep it")
    a = ap.parse_args()
    if a.keep:
        T = Path(a.keep).resolve()
        T.mkdir(parents=True, exist_ok=True)
        if any(T.iterdir()):
            sys.exit(f"{T}: not empty")
    else:
        T = Path(tempfile.mkdtemp(prefix="mlrg-probe-")).resolve()
    RUN = T / "run"
    t0 = time.perf_counter()
    print(f"probe folder {T}", flush=True)
    try:
        studies_together()
        if not (RUN / "finetune" / "best.pt").is_file():
            raise SystemExit("the first study left no finetune/best.pt: the other cases need it")
        killed_study()
        encodings()
        io = io_inputs()
        full_disk(io)
        read_only(io)
        refused_presets()
        second_writer()
        report_vs_generate()
        failed_rerun()
        no_empty_aside()
    finally:
        for d in (T / "small", T / "ro"):
            if os.path.ismount(d):
                subprocess.run(["umount", str(d)], check=False)
        wall = time.perf_counter() - t0
        bad = [r["case"] for r in ROWS if r["ok"] == "NOT OK"]
        out = REPO / "benchmarks" / "results" / "probe_run_folder.json"
        save_json(
            {
                "what": "hostile probe of the mlrg command line on a run folder (issue 19)",
                "python": sys.executable,
                "folder": str(T),
                "kept": bool(a.keep),
                "wall_seconds": round(wall, 1),
                "not_ok": bad,
                "cases": ROWS,
            },
            out,
        )
        print(f"\n{len(ROWS)} cases, {len(bad)} NOT OK{': ' + ', '.join(bad) if bad else ''}; "
              f"{wall:.0f} s; {out}", flush=True)
        if not a.keep:
            shutil.rmtree(T, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
