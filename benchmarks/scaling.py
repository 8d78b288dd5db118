"""Scaling: how the sweep's cost per trial grows from tens to a thousand trials (issue 15, item 1).

N trials of a fixed, known cost through `python sweep.py` (MLflow, checkpoints, live view, report) against a bare
Ray Tune `Tuner` with `reuse_actors=True` on the same trials (`_raw_tune.py --trials N`: same model, data and
epochs; no searcher, no MLflow, no checkpoints), each a fresh process, back to back, for each N and each tracking
store: a SQLite file, and an `mlflow server` in front of PostgreSQL on 127.0.0.1 (started once per invocation with
the helpers of tests/test_tracking_outage.py). Every run of one store writes to the same MLflow experiment.

The trials: baseline_cnn (width 0.5) on 512 synthetic 16x16 images, 3 epochs of batch 64, no early stopping, 1 CPU
each, 2 at a time. In sweep.py they are one cell whose lr is searched by Optuna TPE (0.01-0.1, N samples, so the
study grows to N trials), under an ASHA whose grace period is the whole budget (it sees every result and stops
none). Neither changes what a trial costs. The known cost C of one trial is `fit()` of the same config in this
process, one thread, alone, before and after the runs (median; `sweep_overhead.known_cost`).

Figures per run (`sweep_overhead.summarize` for the span-based ones):
- wall s: process start to exit; start-up s: to the first trial's start; shutdown s: last trial's end to exit
  (Tune's last snapshot, the figures that waited for a spare core, the report);
- per-trial overhead s: (2 x span - N x C) / N, trial-slot seconds each trial costs beyond C; "whole" adds the
  start-up and shutdown: (2 x wall - N x C) / N;
- driver CPU s: the driver process's own user + system CPU (read from /proc every 0.5 s), per trial;
- store CPU s (PostgreSQL): the mlflow server and postgres processes (theirs and their reaped children's CPU);
- where ours' driver spends its CPU: py-spy samples of the driver (`py-spy record --format raw --nonblocking`),
  each stack put in the first category (in the order of CATEGORIES) any of its frames belongs to, by module path;
- estimate/actual: `sweep.py SPEC --dry-run --estimate` run just before ours' SQLite run, once against that store
  (earlier runs of the same cell there: "measured") and once against an empty one ("timed" training steps).

Goals (issue 15): per-trial overhead at the largest N at most 1.2x that at N = 50, and at most 1.2x the bare
Tuner's at the same N. `--results FILE` saves every run's figures (JSON lines) as the run ends and judges the goals
over the whole file, so N = 1,000 can run in a later invocation than N = 50; `--show` prints a file's tables.

    python benchmarks/scaling.py [--quick] [--sizes 50,200,1000] [--stores sqlite,postgres] [--concurrency 2]
                                 [--checkpointed-bare]
                                 [--results FILE] [--show]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, machine_line, median, parser, show
from sweep_overhead import CONCURRENCY, WORKLOAD, known_cost, summarize, trial_results

HERE = Path(__file__).resolve().parent
EPOCHS, IMAGES = 3, 512
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOAL = 1.2
BARE = "bare Tuner, reuse_actors"
BARE_CHECKPOINTS = "bare Tuner, reuse_actors, checkpoints"  # --checkpointed-bare: what checkpoints alone cost
# The code measured: the checkout's commit when this benchmark started ("+" when tracked files differ from it).
COMMIT = subprocess.run("git rev-parse --short HEAD && git status --porcelain --untracked-files=no | head -1",
                        shell=True, cwd=ROOT, capture_output=True, text=True).stdout.split("\n", 1)
COMMIT = COMMIT[0] + ("+" if COMMIT[1].strip() else "")

SPEC = "name: scaling-n{trials}\nexperiment: scaling\n" + WORKLOAD + """\
search:
  lr: {{type: loguniform, low: 0.01, high: 0.1}}
samples_per_cell: {trials}
seeds: [0]
scheduler: {{type: asha, grace_period: {epochs}, max_t: {epochs}}}
resources: {{cpu: 1, gpu: 0}}
max_concurrent: {concurrency}
"""

# (category, module paths): a py-spy stack goes to the first category any of its frames belongs to. Contexts come
# first: an import, a Tune experiment snapshot (it pickles the searcher and the callbacks) or the report owns
# everything below it.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("imports", ("<frozen importlib._bootstrap",)),
    ("checkpoints", ("resnet_lab/tune/checkpoints.py", "ray/tune/execution/experiment_state.py",
                     "ray/train/_internal/checkpoint_manager.py", "ray/tune/execution/checkpoint_manager.py",
                     "ray/train/_internal/storage.py")),
    ("report", ("resnet_lab/report/",)),
    ("searcher", ("optuna/", "resnet_lab/tune/search.py", "ray/tune/search/")),
    ("scheduler", ("resnet_lab/tune/schedule.py", "ray/tune/schedulers/")),
    ("MLflow", ("mlflow/", "resnet_lab/tracking/")),
    ("live view", ("resnet_lab/console.py", "rich/")),
    ("figures", ("resnet_lab/tune/figures.py", "resnet_lab/plots.py")),
    ("our callback", ("resnet_lab/tune/callbacks.py",)),
]
OTHER = "Ray/other"
SHOWN = [name for name, _ in CATEGORIES] + [OTHER]


def category(stack: str) -> str:
    """The category of one py-spy raw stack (`func (path:line);func (path:line);...`)."""
    frames = stack.split(";")
    for name, paths in CATEGORIES:
        for frame in frames:
            if any(f"({p}" in frame or f"/{p}" in frame for p in paths):
                return name
    return OTHER


def attribute(raw: Path) -> Counter[str]:
    """Samples per category from a `py-spy record --format raw` file."""
    out: Counter[str] = Counter()
    if not raw.exists():
        return out
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack.strip() and count.isdigit():  # --nonblocking: a stack read mid-change can come back empty
            out[category(stack)] += int(count)
    return out


# -- processes ------------------------------------------------------------------------------------------------------
def proc_cpu_s(pid: int, reaped: bool = False) -> float | None:
    """User + system CPU seconds of `pid` (plus its reaped children's with `reaped`), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / CLK_TCK


def tree_cpu_s(roots: Sequence[int]) -> float:
    """CPU seconds of the process trees under `roots`, their reaped children included."""
    from procs import descendants  # tests/procs.py, on sys.path with the Postgres helpers

    pids = {p for root in roots for p in (root, *descendants(root))}
    return sum(proc_cpu_s(p, reaped=True) or 0.0 for p in pids)


@dataclass
class Process:
    """One timed process: wall, launch and exit unix times, its own CPU, the store's CPU, py-spy samples."""

    wall_s: float
    launch: float
    exit: float
    cpu_s: float
    store_cpu_s: float | None
    samples: dict[str, int] = field(default_factory=dict)
    sampled_s: float = 0.0
    profiler_cpu_s: float = 0.0  # py-spy's own CPU: it competes with the trials too


def timed_run(cmd: list[str], work: Path, env: dict[str, str], timeout_s: float, profile_hz: int = 0,
              store_roots: Sequence[int] = ()) -> Process:
    """Run `cmd` in `work` (output to work/out.log); poll its CPU; with `profile_hz`, sample it with py-spy."""
    store_before = tree_cpu_s(store_roots) if store_roots else None
    log = (work / "out.log").open("w")
    launch, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    spy = None
    raw = work / "pyspy.txt"
    if profile_hz:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate", str(profile_hz), "--format",
                                "raw", "--nonblocking", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=(work / "pyspy.log").open("w"))
    cpu = spy_cpu = 0.0
    try:
        while proc.poll() is None:
            cpu = proc_cpu_s(proc.pid) or cpu  # the last reading before exit: at most 0.5 s of CPU is missed
            spy_cpu = (proc_cpu_s(spy.pid) or spy_cpu) if spy is not None else 0.0
            if time.perf_counter() - start > timeout_s:
                sys.exit(f"{' '.join(cmd)}: still running after {timeout_s:.0f} s; stopped (see {work / 'out.log'})")
            time.sleep(0.5)
    finally:
        if proc.poll() is None:  # timed out, or this benchmark was stopped: stop the run too
            proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops, Ray and its workers are shut down
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    wall, end = time.perf_counter() - start, time.time()
    log.close()
    if spy is not None:
        spy.wait(timeout=120)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(work / 'out.log').read_text()[-3000:]}")
    store = tree_cpu_s(store_roots) - store_before if store_before is not None else None
    samples = attribute(raw)
    return Process(wall, launch, end, cpu, store, dict(samples), sum(samples.values()) / max(profile_hz, 1), spy_cpu)


# -- stores ---------------------------------------------------------------------------------------------------------
@dataclass
class Store:
    """A tracking store the sweeps write to: its URI and the PIDs whose CPU is the store's."""

    name: str
    uri: str
    roots: Callable[[], list[int]] = list


@contextmanager
def stores(names: Sequence[str], tmp: Path) -> Iterator[dict[str, Store]]:
    """The stores asked for: a SQLite file; PostgreSQL with an `mlflow server` in front (closed on exit)."""
    out = {}
    if "sqlite" in names:
        out["sqlite"] = Store("sqlite", f"sqlite:///{tmp}/mlflow.db")
    pg = server = None
    try:
        if "postgres" in names:
            sys.path.insert(0, str(ROOT / "tests"))
            from test_tracking_outage import MlflowServer, Postgres  # the tests' real servers, not a copy

            started = time.perf_counter()
            pg = Postgres()
            server = MlflowServer(pg.uri, tmp)
            print(f"PostgreSQL on port {pg.port}, mlflow server at {server.uri} (up in "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)
            assert server.proc is not None
            roots = [pg.pid(), server.proc.pid]
            out["postgres"] = Store("postgres", server.uri, lambda: roots)
        yield out
    finally:
        if server is not None:
            server.close()
        if pg is not None:
            pg.close()


# -- the estimate ---------------------------------------------------------------------------------------------------
UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


def dry_run_estimate(spec: Path, uri: str, work: Path, env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, 'measured'/'timed') that `sweep.py SPEC --dry-run --estimate` predicts."""
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--dry-run", "--estimate",
                           "--tracking-uri", uri], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    found = re.search(r"wall about ([\d.]+) (s|min|h) at", proc.stdout)
    if proc.returncode != 0 or not found:
        sys.exit(f"--dry-run --estimate failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    source = "measured" if "measured (" in proc.stdout else "timed"
    return float(found.group(1)) * UNITS[found.group(2)], source


# -- one N ----------------------------------------------------------------------------------------------------------
def span_ends(storage: Path) -> tuple[float, float]:
    """Unix times of the first trial's start and the last trial's end (Ray's timestamps in result.json)."""
    results = trial_results(storage)
    first = min(t[0]["timestamp"] - t[0]["time_this_iter_s"] for t in results)
    return first, max(t[-1]["timestamp"] for t in results)


def row(n: int, path: str, store: str, proc: Process, storage: Path, cost: float) -> dict[str, Any]:
    """Everything measured for one run, as one JSON-able dict (per-trial figures are derived when printed)."""
    s = summarize(path, proc.wall_s, storage, n, cost)  # also checks that every trial left its results
    first, last = span_ends(storage)
    return {"n": n, "path": path, "store": store, "cost_s": cost, "wall_s": proc.wall_s, "span_s": s["span"],
            "startup_s": first - proc.launch, "shutdown_s": proc.exit - last, "work_s": s["work"],
            "driver_cpu_s": proc.cpu_s, "store_cpu_s": proc.store_cpu_s, "samples": proc.samples,
            "sampled_s": proc.sampled_s, "profiler_cpu_s": proc.profiler_cpu_s, "load": os.getloadavg()[0],
            "when": time.strftime("%Y-%m-%d %H:%M"), "commit": COMMIT}


def slots(r: dict[str, Any]) -> int:
    """Trials at once in the run (`--concurrency`; runs saved before the option had 2)."""
    return int(r.get("slots", CONCURRENCY))


def per_trial_s(r: dict[str, Any]) -> float:
    """Trial-slot seconds each trial cost beyond C over the span of the trials: (slots x span - N x C) / N."""
    return (slots(r) * r["span_s"] - r["n"] * r["cost_s"]) / r["n"]


def whole_per_trial_s(r: dict[str, Any]) -> float:
    """The same over the whole run, start-up and shutdown included: (slots x wall - N x C) / N."""
    return (slots(r) * r["wall_s"] - r["n"] * r["cost_s"]) / r["n"]


def save(results: Path | None, rows: Sequence[dict[str, Any]]) -> None:
    """Write `rows` into the results file, replacing earlier versions of the same runs (same `id`)."""
    if results is None:
        return
    ids = {r["id"] for r in rows}
    kept = [line for line in (results.read_text().splitlines() if results.exists() else [])
            if line.strip() and json.loads(line).get("id") not in ids]
    results.write_text("".join(line + "\n" for line in kept + [json.dumps(r) for r in rows]))


def run_size(n: int, names: Sequence[str], found: dict[str, Store], tmp: Path, env: dict[str, str], cost: float,
             rate: int, results: Path | None, at_once: int = CONCURRENCY,
             checkpointed: bool = False, checkpoint_every: str = "auto") -> list[dict[str, Any]]:
    """sweep.py on each store, then the bare Tuner, for `n` trials, `at_once` at a time; each run saved to
    `results` as it ends. `checkpoint_every`: the spec's (default "auto": by time, so these sub-second trials
    checkpoint at their last epoch only; a number: every that many epochs)."""
    spec = tmp / f"scaling-n{n}.yaml"
    spec.write_text(SPEC.format(trials=n, images=IMAGES, epochs=EPOCHS, concurrency=at_once, device="cpu") +
                    (f"checkpoint_every: {checkpoint_every}\n" if checkpoint_every != "auto" else ""))
    ours = "sweep.py" + (f", checkpoint_every {checkpoint_every}" if checkpoint_every != "auto" else "")
    timeout = 600 + 10 * n
    out = []
    for name in names:
        store = found[name]
        work = tmp / f"n{n}-{name}"
        work.mkdir()
        estimates = {}
        if name == "sqlite":  # before launch, as a user would: the store's earlier runs, and timed steps
            estimates["store"] = dry_run_estimate(spec, store.uri, work, env)
            estimates["empty"] = dry_run_estimate(spec, f"sqlite:///{work}/empty.db", work, env)
        proc = timed_run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", store.uri,
                          "--storage", str(work / "results"), "--ray-temp-dir", str(work / "ray")],
                         work, env, timeout, profile_hz=rate, store_roots=store.roots())
        r = row(n, ours, name, proc, work / "results", cost)
        r.update(estimates=estimates, id=f"{tmp.name}-n{n}-{name}", run=tmp.name, slots=at_once)
        out.append(r)
        save(results, out)
        print(f"  N={n} {ours} ({name}): wall {proc.wall_s:.1f} s", flush=True)
        shutil.rmtree(work / "ray", ignore_errors=True)
        shutil.rmtree(work / "results", ignore_errors=True)
    for path, extra in [(BARE, []), *([(BARE_CHECKPOINTS, ["--checkpoints"])] if checkpointed else [])]:
        work = tmp / f"n{n}-bare{extra[0] if extra else ''}"
        work.mkdir()
        proc = timed_run([sys.executable, str(HERE / "_raw_tune.py"), str(spec), "--storage", str(work / "results"),
                          "--ray-temp-dir", str(work / "ray"), "--reuse-actors", "--trials", str(n),
                          "--max-concurrent", str(at_once), *extra], work, env, timeout)
        out.append(row(n, path, "-", proc, work / "results", cost))
        out[-1].update(id=f"{tmp.name}-n{n}-{path}", run=tmp.name, slots=at_once)
        save(results, out)
        print(f"  N={n} {path}: wall {proc.wall_s:.1f} s", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return out


# -- tables ---------------------------------------------------------------------------------------------------------
def bare_of(rows: Sequence[dict[str, Any]], mine: dict[str, Any]) -> dict[str, Any] | None:
    """The bare Tuner's run at the same N and concurrency, from the same invocation when there is one."""
    bare = [r for r in rows if r["n"] == mine["n"] and slots(r) == slots(mine) and r["path"] == BARE]
    same = [r for r in bare if r.get("run") == mine.get("run")]
    return (same or bare or [None])[0]


def print_tables(rows: list[dict[str, Any]]) -> None:
    """The per-run table, where ours' driver CPU goes, and the estimates."""
    lines = []
    for r in rows:
        bare = bare_of(rows, r)
        lines.append([f"{r['n']:,}", str(slots(r)), r["path"], r["store"], r.get("commit", "?"), f"{r['wall_s']:.0f}",
                      f"{r['startup_s']:.0f}",
                      f"{r['span_s']:.0f}", f"{r['shutdown_s']:.0f}", f"{per_trial_s(r):.2f}",
                      f"{whole_per_trial_s(r):.2f}", f"{r['driver_cpu_s']:.0f}",
                      f"{r['driver_cpu_s'] / r['n']:.3f}",
                      "-" if r["store_cpu_s"] is None else f"{r['store_cpu_s'] / r['n']:.3f}",
                      f"{per_trial_s(r) / per_trial_s(bare):.2f}" if bare else "-",
                      f"{r['wall_s'] / bare['wall_s']:.2f}" if bare else "-"])
    cost = median([r["cost_s"] for r in rows])
    show(f"scaling: N trials x {EPOCHS} epochs (known cost C = {cost:.2f} s each); `at once`: trials at a time",
         ["N", "at once", "path", "store", "code", "wall s", "start-up s", "span s", "shutdown s",
          "per-trial overhead s", "whole run per trial s", "driver CPU s", "driver CPU / trial s",
          "store CPU / trial s", "overhead vs bare", "wall vs bare"], lines)
    ours = [r for r in rows if r["samples"]]
    if ours:
        lines = []
        for r in ours:
            total = sum(r["samples"].values())
            scale = r["sampled_s"] / total if total else 0.0  # seconds per sample
            counts = [r["samples"].get(c, 0) for c in SHOWN]
            lines.append([f"{r['n']:,}", r["store"], r.get("commit", "?"), f"{r['sampled_s']:.0f}",
                          f"{r.get('profiler_cpu_s', 0):.0f}"] +
                         [f"{1000 * k * scale / r['n']:.0f} ({100 * k / total:.0f}%)" for k in counts])
        show("where ours' driver CPU goes (py-spy samples): ms per trial (share of the driver's sampled CPU)",
             ["N", "store", "code", "sampled s", "py-spy's CPU s", *SHOWN], lines)
    with_estimate = [r for r in rows if r.get("estimates")]
    if with_estimate:
        lines = []
        for r in with_estimate:
            for which, (seconds, source) in sorted(r["estimates"].items()):
                lines.append([f"{r['n']:,}", r.get("commit", "?"),
                              f"{'this store' if which == 'store' else 'an empty store'} ({source})",
                              f"{seconds:.1f}", f"{r['wall_s']:.0f}", f"{r['span_s']:.0f}",
                              f"{seconds / r['wall_s']:.2f}", f"{seconds / r['span_s']:.2f}"])
        show("`sweep.py SPEC --dry-run --estimate` before launch vs the run (SQLite)",
             ["N", "code", "estimate from", "estimate s", "actual wall s", "actual span s", "estimate / wall",
              "estimate / span"], lines)


def print_goals(rows: list[dict[str, Any]]) -> None:
    """Per-trial overhead at the largest N vs N = 50, and vs the bare Tuner at each N."""
    lines = []
    for store, path, commit, k in sorted({(r["store"], r["path"], r.get("commit", "?"), slots(r)) for r in rows
                                          if r["store"] != "-"}):
        ours = {r["n"]: r for r in rows  # last run wins
                if r["store"] == store and r["path"] == path and r.get("commit", "?") == commit and slots(r) == k}
        small = ours.get(50) or ours[min(ours)]
        for n in sorted(ours):
            r, bare = ours[n], bare_of(rows, ours[n])
            growth = per_trial_s(r) / per_trial_s(small)
            versus = per_trial_s(r) / per_trial_s(bare) if bare else float("nan")
            label = store if path == "sweep.py" else f"{store} ({path.removeprefix('sweep.py, ')})"
            lines.append([label, f"{n:,}", str(k), f"{per_trial_s(r):.2f}", f"{per_trial_s(bare):.2f}" if bare else "-",
                          f"{growth:.2f} ({'met' if growth <= GOAL else 'not met'})",
                          f"{versus:.2f} ({'met' if versus <= GOAL else 'not met'})",
                          f"{1000 * r['driver_cpu_s'] / n:.0f}", f"{r['when']} ({commit})"])
    show(f"goals: per-trial overhead vs N = {min(r['n'] for r in rows)} and vs the bare Tuner, each <= {GOAL}",
         ["store", "N", "at once", "ours s", "bare s", "vs smallest N", "vs bare Tuner", "driver CPU ms / trial",
          "measured"],
         lines)


def load(results: Path) -> list[dict[str, Any]]:
    """Every run saved in a results file."""
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="trial counts, comma-separated (default 50,200,1000; --quick 20,50)")
    p.add_argument("--stores", default=None, help="sqlite,postgres (default both; --quick sqlite)")
    p.add_argument("--rate", type=int, default=20, help="py-spy samples per second of ours' driver (0: off)")
    p.add_argument("--results", type=Path, default=None,
                   help="save each run's figures here (JSON lines) as it ends; the goals are judged over the file")
    p.add_argument("--show", action="store_true", help="print the tables of --results FILE and exit (no runs)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--checkpointed-bare", action="store_true",
                   help="also run the bare Tuner with a checkpoint per epoch (what checkpoints alone cost)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY,
                   help=f"trials at once (default {CONCURRENCY}: both cores; 1 leaves a core to the driver, as a "
                        "cluster's head node does)")
    p.add_argument("--checkpoint-every", default="auto",
                   help="the spec's checkpoint_every for ours' trials: auto (the default: by time, so these trials "
                        f"checkpoint their last epoch only) or every this many epochs (1: every epoch; {EPOCHS} or "
                        "more: the last only)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill PID`: stop the run and the servers cleanly
    if args.show:
        if not args.results or not args.results.exists():
            sys.exit("--show needs --results FILE (an existing file written by an earlier run)")
        print_tables(load(args.results))
        print_goals(load(args.results))
        return 0
    if args.device == "cuda":
        sys.exit("scaling.py measures orchestration with CPU trials; --device cuda is not supported")
    sizes = [int(x) for x in (args.sizes or ("20,50" if args.quick else "50,200,1000")).split(",")]
    names = (args.stores or ("sqlite" if args.quick else "sqlite,postgres")).split(",")
    unknown = set(names) - {"sqlite", "postgres"}
    if unknown:
        sys.exit(f"--stores: unknown {', '.join(sorted(unknown))} (choose from sqlite, postgres)")
    if args.rate and not shutil.which("py-spy"):
        sys.exit("py-spy is not installed: pip install py-spy (or --rate 0 for no profile)")
    print(machine_line("cpu"), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="rls-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    print(f"N = {', '.join(map(str, sizes))} trials x {EPOCHS} epochs (baseline_cnn w0.5, {IMAGES} synthetic 16x16 "
          f"images), {args.concurrency} at a time, 1 CPU each; stores {', '.join(names)}; work dir {tmp}\n", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    spec = tmp / "cost.yaml"
    spec.write_text(SPEC.format(trials=1, images=IMAGES, epochs=EPOCHS, concurrency=CONCURRENCY, device="cpu"))
    costs = known_cost(spec, 3)
    print(f"  known cost C, before the runs: {', '.join(f'{c:.2f}' for c in costs)} s", flush=True)
    rows: list[dict[str, Any]] = []
    with stores(names, tmp) as found:
        for n in sizes:
            rows += run_size(n, names, found, tmp, env, median(costs), args.rate, args.results, args.concurrency,
                             args.checkpointed_bare, args.checkpoint_every)
    costs += known_cost(spec, 3)
    cost = median(costs)
    print(f"  known cost C of one trial (fit() in-process, 1 thread, alone): median {cost:.2f} s (range "
          f"{min(costs):.2f}-{max(costs):.2f} s over {len(costs)} runs)\n", flush=True)
    for r in rows:  # every run of this invocation against the median of all of C's measurements
        r["cost_s"] = cost
    save(args.results, rows)
    print_tables(rows)
    print_goals(load(args.results) if args.results else rows)
    print(machine_line("cpu"))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
