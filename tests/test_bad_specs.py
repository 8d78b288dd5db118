"""Bad input: every kind of mistake in tests/specs/bad/ (and in --set) exits 2 with `file:line: field: message`.

Every case runs in its own empty working directory with its own empty HOME, so a run that started Ray or MLflow,
downloaded data or executed a spec value would leave files behind. To stay fast on a small CI machine, one fresh
interpreter (the driver) runs the CLI's `main()` for every case in turn and reports which heavy modules all of them
together imported; a few representative cases also run as a real `python sweep.py ...`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from resnet_lab.spec.errors import SpecError
from resnet_lab.spec.load import load_spec
from resnet_lab.spec.loader import MAX_SPEC_BYTES

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "specs" / "bad"
BAD_SPECS = sorted(BAD.glob("*.yaml"))
GOOD = "name: good\ntrainer: {epochs: 2}\n"

# Files that cannot carry their expectation as a first-line comment.
SIDECAR = {
    "empty_file.yaml": ":1: the spec is empty; expected a mapping with at least `name`",
    "a_directory.yaml": ": is a directory; expected a YAML spec file",
}
# Mistakes in the file as a whole (unreadable, not YAML, not a mapping): there is no field to name.
WHOLE_FILE = {"a_directory.yaml", "comments_only.yaml", "control_character.yaml", "empty_file.yaml",
              "non_string_key.yaml", "non_utf8.yaml", "nul_byte.yaml", "tab_indent.yaml", "top_level_list.yaml",
              "top_level_scalar.yaml", "two_documents.yaml", "yaml_syntax_error.yaml"}
HUGE = "9" * 400
BOMB = "{" + ", ".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 9) + "]" for i in range(9)) + "}"
# --set values get the same treatment as the file: (id, overrides, expected substring).
SET_CASES = [
    ("set_bad_value", ["trainer.epochs=-2"], "good.yaml: trainer.epochs: input should be greater than 0 (got -2)"),
    ("set_unknown_key", ["trainer.epoch=3"], "good.yaml: trainer.epoch: unknown key; did you mean 'epochs'?"),
    ("set_string_for_int", ["trainer.epochs=abc"], "good.yaml: trainer.epochs: input should be a valid integer "
                                                   "(got 'abc')"),
    ("set_without_equals", ["trainer.epochs"], "--set trainer.epochs: expected KEY.PATH=VALUE"),
    ("set_not_a_field_path", ["trainer/epochs=3"], "--set trainer/epochs=3: trainer/epochs: not a field path"),
    ("set_into_a_value", ["trainer.epochs.max=3"], "--set trainer.epochs.max=3: trainer.epochs.max: trainer.epochs "
                                                   "is a single value (2), not a section with fields"),
    ("set_python_tag", ['trainer.lr=!!python/object/apply:os.system ["touch pwned"]'],
     "trainer.lr: tag '!!python/object/apply:os.system' is not allowed"),
    ("set_shell_in_name", ["name=$(touch pwned)"], "good.yaml: name: should be 1 to 64 letters"),
    ("set_huge_integer", [f"trainer.epochs={HUGE}"], "trainer.epochs: 99999999...9999 (400 digits) is too large"),
    ("set_alias_bomb", [f"description={BOMB}"], "description.l4[0]: aliases expand to more than 10,000 values"),
    ("set_bad_grid_value", ["grid.depth=[10, 19]"], "good.yaml: grid: grid combination {model.depth=19}: "
                                                    "model.depth: depth 19 is not supported by 'resnet'"),
    ("set_samples_without_search", ["samples_per_cell=4"], "good.yaml: samples_per_cell: needs a `search` section"),
]
# A fresh interpreter runs `resnet_lab.cli.main(args)` for each job in its own cwd and HOME, and reports on stdout
# (as JSON) each job's exit code and output, and the heavy modules imported by the end.
DRIVER = """
import contextlib, io, json, os, sys, time, traceback
jobs = json.load(sys.stdin)
from resnet_lab.cli import main
results = {}
for name, (args, box) in jobs.items():
    os.chdir(os.path.join(box, "cwd"))
    os.environ["HOME"] = os.path.join(box, "home")
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = exc.code
        except BaseException:
            traceback.print_exc()
            rc = -1
    results[name] = dict(rc=rc, stdout=out.getvalue(), stderr=err.getvalue(), wall_s=time.perf_counter() - start)
heavy = sorted(m for m in ("torch", "torchvision", "ray", "mlflow", "optuna") if m in sys.modules)
print(json.dumps(dict(results=results, heavy=heavy)))
"""
MAX_WALL_S = 1.0  # per case, once imports are done; an alias bomb or a 400-digit number must not slow this down
SUBPROCESS_CASES = ["python_object_tag.yaml", "alias_bomb.yaml", "non_utf8.yaml", "set_bad_value"]


@dataclass(frozen=True)
class Run:
    """What one CLI run left: exit code, output, wall time, and the files in its cwd and HOME afterwards."""

    rc: int
    stdout: str
    stderr: str
    wall_s: float
    left_behind: list[str]


def expectation(path: Path) -> str:
    """The `# expect: ...` first line of a bad spec (ASCII even where the rest is not UTF-8), or its sidecar."""
    if path.name in SIDECAR:
        return SIDECAR[path.name]
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name}: the first line must be `# expect: <substring>`"
    return first.removeprefix("# expect: ")


def new_box(root: Path) -> Path:
    """A directory holding an empty `cwd` and an empty `home` for one run."""
    for sub in ("cwd", "home"):
        (root / sub).mkdir(parents=True)
    return root


def left_behind(box: Path) -> list[str]:
    """Everything a run wrote into its cwd or HOME."""
    return [str(p.relative_to(box)) for p in sorted(box.rglob("*")) if p not in (box / "cwd", box / "home")]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid spec for the --set cases."""
    path = tmp_path_factory.mktemp("good") / "good.yaml"
    path.write_text(GOOD)
    return path


def jobs_for(good: Path) -> dict[str, list[str]]:
    """CLI arguments of every case: each bad spec file, and the good spec with each bad --set."""
    jobs = {path.name: [str(path)] for path in BAD_SPECS}
    jobs.update({case_id: [str(good), *(a for value in sets for a in ("--set", value))]
                 for case_id, sets, _ in SET_CASES})
    return jobs


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory, good: Path) -> tuple[dict[str, Run], list[str]]:
    """Every case through `main()` in one fresh interpreter: (runs by case, heavy modules imported)."""
    root = tmp_path_factory.mktemp("driven")
    boxes = {name: new_box(root / name) for name in jobs_for(good)}
    payload = json.dumps({name: [args, str(boxes[name])] for name, args in jobs_for(good).items()})
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=payload, capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    runs = {name: Run(r["rc"], r["stdout"], r["stderr"], r["wall_s"], left_behind(boxes[name]))
            for name, r in report["results"].items()}
    return runs, report["heavy"]


@pytest.fixture(scope="module")
def runs(driven: tuple[dict[str, Run], list[str]]) -> dict[str, Run]:
    """Each case's run through `main()`."""
    return driven[0]


def assert_clean_usage_error(run: Run, sources: Sequence[str]) -> list[str]:
    """Exit 2, one `error: SOURCE...` line per problem, no traceback, nothing printed on stdout, nothing written."""
    assert run.rc == 2, f"exit code {run.rc}\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stdout == "", f"printed on stdout:\n{run.stdout}"
    assert run.left_behind == [], f"wrote {run.left_behind}"
    lines = run.stderr.rstrip("\n").splitlines()
    assert lines, "no error message"
    for line in lines:
        assert line.startswith(tuple(f"error: {s}" for s in sources)), f"not one line per problem: {line!r}"
    return lines


def test_there_is_a_bad_spec_for_every_kind_of_mistake() -> None:
    assert len(BAD_SPECS) >= 30
    for path in BAD_SPECS:
        assert expectation(path), path.name


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_spec_exits_2_with_file_line_field_message(runs: dict[str, Run], path: Path) -> None:
    run = runs[path.name]
    lines = assert_clean_usage_error(run, [str(path)])
    assert run.wall_s < MAX_WALL_S, f"took {run.wall_s:.2f} s"
    expected = expectation(path)
    assert f"{path}{expected}" in run.stderr, f"expected {path.name}{expected}\ngot:\n{run.stderr}"
    if path.name == "a_directory.yaml":
        return
    located = re.compile(rf"^error: {re.escape(str(path))}:(\d+): ")
    with_field = re.compile(rf"^error: {re.escape(str(path))}:\d+: [^\s:]+: \S")  # a field path has no spaces
    for line in lines:
        assert located.match(line), f"no line number: {line!r}"
        if path.name not in WHOLE_FILE:
            assert with_field.match(line), f"no field path: {line!r}"


@pytest.mark.parametrize(("case_id", "sets", "expected"), SET_CASES, ids=[c[0] for c in SET_CASES])
def test_bad_set_value_exits_2_and_names_the_field(runs: dict[str, Run], good: Path, case_id: str,
                                                    sets: list[str], expected: str) -> None:
    run = runs[case_id]
    assert_clean_usage_error(run, ["--set ", f"{good}: "])
    assert run.wall_s < MAX_WALL_S, f"took {run.wall_s:.2f} s"
    assert expected in run.stderr, f"expected {expected}\ngot:\n{run.stderr}"


def test_no_bad_input_imports_torch_ray_mlflow_or_optuna(driven: tuple[dict[str, Run], list[str]]) -> None:
    runs, heavy = driven
    assert len(runs) == len(BAD_SPECS) + len(SET_CASES)
    assert heavy == [], f"a spec error imported {heavy}: Ray or MLflow could have started"


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_python_sweep_py_exits_2_in_a_second_and_writes_nothing(tmp_path: Path, good: Path, case: str) -> None:
    args = jobs_for(good)[case]
    box = new_box(tmp_path)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], cwd=box / "cwd", capture_output=True,
                          text=True, env={**os.environ, "HOME": str(box / "home"), "PYTHONDONTWRITEBYTECODE": "1"},
                          timeout=60)
    wall_s = time.monotonic() - start
    assert_clean_usage_error(Run(proc.returncode, proc.stdout, proc.stderr, 0.0, left_behind(box)),
                             ["--set ", f"{good}: ", f"{BAD}/"])
    assert wall_s < 10, f"took {wall_s:.1f} s (imports included; about 1 s on an idle machine)"


def test_set_errors_name_the_option_they_came_from(runs: dict[str, Run]) -> None:
    # The message must reach the terminal verbatim: `[from --set ...]` (and any `[word]` in a user's value) is text,
    # not console markup for rich to swallow; console.error has to escape it (rich.markup.escape).
    stderr = runs["set_bad_value"].stderr
    assert "(got -2) [from --set trainer.epochs=-2]" in stderr, f"console ate the markup-like text:\n{stderr}"


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    levels = 30  # 9**30 values if expanded
    lines = ["name: bomb", "l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    spec = tmp_path / "bomb.yaml"
    spec.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    with pytest.raises(SpecError, match="aliases expand to more than 10,000 values"):
        load_spec(str(spec))
    assert time.monotonic() - start < 1.0


def test_python_tags_are_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    spec = tmp_path / "tag.yaml"
    for tag in ("!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/object/apply:exec"):
        spec.write_text(f'name: t\ndescription: {tag} ["touch {marker}"]\n')
        with pytest.raises(SpecError, match=rf"tag.yaml:2: description: tag '{re.escape(tag)}' is not allowed"):
            load_spec(str(spec))
    assert not marker.exists()


def test_yaml_1_1_surprises_are_errors_or_strings_not_silent_values(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("name: 2024-01-01\ndescription: =\nseeds: [1_000]\n")
    loaded = load_spec(str(spec))  # a date-like name stays a string; `=` is text; underscores group digits
    assert (loaded.spec.name, loaded.spec.description, loaded.spec.seeds) == ("2024-01-01", "=", [1000])


def load_in_thread(path: str, timeout_s: float = 10.0) -> str:
    """load_spec(path) in a daemon thread: a loader that blocks (a FIFO) fails the test instead of hanging it."""
    outcome: list[str] = []

    def target() -> None:
        try:
            load_spec(path)
            outcome.append("loaded")
        except SpecError as exc:
            outcome.append(str(exc))
        except BaseException as exc:  # reported below, with its type
            outcome.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return "still reading"
    return outcome[0]


def test_a_fifo_is_refused_before_it_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    start = time.monotonic()
    message = load_in_thread(str(fifo))
    if message == "still reading":  # blocked in open() or read(): a writer that closes at once lets the thread go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert message == f"{fifo}: is a FIFO (named pipe), not a regular file; a spec must be a regular YAML file " \
                      "(it is not read)"
    assert time.monotonic() - start < 1.0


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_dev_zero_is_refused_not_read_without_limit() -> None:
    start = time.monotonic()
    message = load_in_thread("/dev/zero")
    assert message == ("/dev/zero: is a character device, not a regular file; a spec must be a regular YAML file "
                       "(it is not read)")
    assert time.monotonic() - start < 1.0


def test_size_is_checked_before_reading(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as f:  # sparse: 10 GiB claimed, nothing on disk; reading it would take minutes
        f.truncate(10 * 2**30)
    start = time.monotonic()
    assert load_in_thread(str(huge)) == (f"{huge}: file is 10,737,418,240 bytes; a spec is at most "
                                         f"{MAX_SPEC_BYTES:,} (it is not read)")
    assert time.monotonic() - start < 1.0
    at_cap = tmp_path / "at_cap.yaml"
    at_cap.write_bytes(b"#" * (MAX_SPEC_BYTES - 1) + b"\n")  # exactly the cap: read, and found empty
    assert "the spec is empty" in load_in_thread(str(at_cap))
    at_cap.write_bytes(b"#" * MAX_SPEC_BYTES + b"\n")
    assert f"is {MAX_SPEC_BYTES + 1:,} bytes; a spec is at most {MAX_SPEC_BYTES:,}" in load_in_thread(str(at_cap))


def test_an_unreadable_file_is_one_clear_error(tmp_path: Path) -> None:
    # As root, mode 000 does not stop a read (PLATFORM_NOTES): a forked child drops to `nobody` and loads there.
    box = Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))
    try:
        box.chmod(0o755)  # pytest's tmp_path sits under a 0700 directory `nobody` cannot enter at all
        spec = box / "spec.yaml"
        spec.write_text(GOOD)
        spec.chmod(0o000)
        message = load_as_unprivileged(str(spec))
    finally:
        shutil.rmtree(box)
    assert message == (f"{spec}: permission denied: this user cannot read the file (check its owner and mode, "
                       "e.g. `ls -l` and `chmod u+r`)")


def load_as_unprivileged(path: str) -> str:
    """str(SpecError) of load_spec(path) in a child process without root's ability to read any file."""
    if os.geteuid() != 0:
        return load_in_thread(path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody (65534), load, report through the pipe, exit without pytest's cleanup
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            text = load_in_thread(path)
        except PermissionError as exc:
            text, code = f"cannot drop root: {exc}", 3
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}"
        os.write(write_end, text.encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 3:
        pytest.skip(f"running as root and {text}")
    return text
