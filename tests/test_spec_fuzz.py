"""Property-based fuzzing of the spec loader: every shipped spec, mutated, loads or fails as a SpecError; never a
traceback, never slow, never a file written.

Hypothesis draws the mutations (a fixed number per test, derandomized: the same corpus on every run, so CI is
repeatable and bounded). Two kinds: byte-level edits (inserted tokens, control characters and invalid UTF-8,
deleted, duplicated, swapped, re-indented or truncated lines) reach the YAML layer; tree-level edits (a value
replaced by any YAML value, a key dropped or added, then dumped back to YAML) reach validation and the cross-field
rules. Each example runs in an empty working directory that must stay empty. A smaller sample goes through the CLI
(`main([SPEC, "--dry-run"])`, in this process) and must exit 0 or 2 without a traceback.

Numbers (specs tried, slowest, exit codes) are printed at the end of each test: `pytest -s tests/test_spec_fuzz.py`.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from resnet_lab.spec.errors import SpecError
from resnet_lab.spec.load import load_spec
from resnet_lab.spec.loader import parse_yaml_text

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "sweeps").glob("*.yaml")) + sorted((ROOT / "tests" / "specs" / "good").glob("*.yaml"))
LOAD_S = 2.0  # per mutated spec, the loader alone (imports done); a spec error must print at once
# Fixed budgets: about 10 s of CPU on a busy 2-core CI machine for the load tests, a few seconds for the CLI one.
# RESNET_LAB_FUZZ_EXAMPLES=5000 hunts longer (same seeds, more of them).
# No shrinking: a failure prints the mutant's bytes as found (shrinking one took over 5 minutes of CI time).
SETTINGS = settings(max_examples=int(os.environ.get("RESNET_LAB_FUZZ_EXAMPLES", "150")), derandomize=True,
                    deadline=None, database=None, print_blob=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLI_SETTINGS = settings(SETTINGS, max_examples=max(15, SETTINGS.max_examples // 10))

# Tokens that have broken YAML loaders: special floats, huge numbers, YAML 1.1 booleans, tags, anchors, aliases,
# merge keys, flow collections, deep nesting, document markers, control characters.
TOKENS = [".inf", "-.inf", ".nan", "1e400", "-0", "0", "-1", "99999999999999999999", "1_000", "0x10", "010",
          "1:30", "~", "null", "yes", "on", "'1'", '"\\x1b[2J"', "[]", "{}", "[[[[[[", "]]", "{a: ", "*a", "&a ",
          "&a [x, *a]", "<<: *a", "<<: [1]", "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!x ",
          "---", "...", "- ", "? ", ": ", "#", "%YAML 1.2\n", "\t", "\x00", "\x1b", "\x7f", "\u2028", "\ufeff",
          "é", "\r", "\n  ", "'", '"', "`", "|", ">", "@", "&", "*", "!", "\\"]
KEYS = ["name", "grid", "search", "trainer", "model", "dataset", "seeds", "confirm", "scheduler", "reference",
        "samples_per_cell", "time_budget_s", "warmup_epochs", "epochs", "lr", "depth", "skip", "type", "low", "high",
        "values", "resources", "metric", "mode", "<<"]


# Read once: Hypothesis replays a draw to shrink a failure, and a spec edited meanwhile would replay differently.
ORIGINALS = {path: path.read_bytes() for path in CORPUS}


def original(path: Path) -> bytes:
    return ORIGINALS[path]


@st.composite
def byte_mutants(draw: st.DrawFn) -> tuple[str, bytes]:
    """(spec name, its bytes after 1-4 random edits)."""
    path = draw(st.sampled_from(CORPUS))
    data = original(path)
    for _ in range(draw(st.integers(1, 4))):
        lines = data.split(b"\n")
        op = draw(st.sampled_from(["insert", "delete", "value", "duplicate", "swap", "indent", "truncate", "byte"]))
        at = draw(st.integers(0, max(0, len(data))))
        line = draw(st.integers(0, max(0, len(lines) - 1)))
        if op == "insert":
            token = draw(st.sampled_from(TOKENS) | st.text(max_size=6))
            data = data[:at] + token.encode("utf-8", "surrogatepass") + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 20)):]
        elif op == "value" and b": " in lines[line]:
            key = lines[line].split(b": ", 1)[0]
            lines[line] = key + b": " + draw(st.sampled_from(TOKENS)).encode()
            data = b"\n".join(lines)
        elif op == "duplicate":
            data = b"\n".join([*lines[: line + 1], lines[line], *lines[line + 1:]])
        elif op == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[line], lines[other] = lines[other], lines[line]
            data = b"\n".join(lines)
        elif op == "indent":
            lines[line] = (b"  " + lines[line]) if draw(st.booleans()) else lines[line][2:]
            data = b"\n".join(lines)
        elif op == "truncate":
            data = data[:at]
        elif op == "byte" and data:
            i = min(at, len(data) - 1)
            data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return path.name, data


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["resnet", "baseline_cnn", "synthetic", "choice", "loguniform", "asha", "val/acc", "fast"]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                                                                      children, max_size=4),
    max_leaves=12)


def plain(value: Any) -> Any:
    """Our loader's LineDict/LineList as plain dicts and lists (what yaml.safe_dump represents)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def paths_in(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path of a nested structure, the root included."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from paths_in(child, (*prefix, key))


@st.composite
def tree_mutants(draw: st.DrawFn) -> tuple[str, bytes]:
    """(spec name, YAML of its parsed tree after 1-3 edits: a value replaced, a key dropped or added)."""
    path = draw(st.sampled_from(CORPUS))
    tree = plain(parse_yaml_text(original(path).decode(), path.name))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths_in(tree))))
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        if not where:
            if op == "add" and isinstance(tree, dict):
                tree[draw(st.sampled_from(KEYS))] = draw(YAML_VALUES)
            continue
        parent = tree
        for key in where[:-1]:
            parent = parent[key]
        if op == "replace":
            parent[where[-1]] = draw(YAML_VALUES)
        elif op == "drop":
            del parent[where[-1]]
        elif isinstance(parent[where[-1]], dict):
            parent[where[-1]][draw(st.sampled_from(KEYS) | st.text(max_size=6))] = draw(YAML_VALUES)
    text = yaml.safe_dump(tree, allow_unicode=draw(st.booleans()), sort_keys=False, default_flow_style=None)
    return path.name, text.encode()


class Tally:
    """What one fuzz test saw: how many specs, how each ended, the slowest."""

    def __init__(self, name: str) -> None:
        self.name, self.outcomes, self.slowest = name, Counter(), (0.0, "")

    def add(self, outcome: str, wall_s: float, spec: str) -> None:
        self.outcomes[outcome] += 1
        if wall_s > self.slowest[0]:
            self.slowest = (wall_s, spec)

    def report(self) -> str:
        return (f"{self.name}: {sum(self.outcomes.values())} mutated specs, outcomes {dict(self.outcomes)}, "
                f"slowest {self.slowest[0]:.3f} s (a mutant of {self.slowest[1]})")


@contextlib.contextmanager
def empty_cwd_and_home() -> Iterator[Path]:
    """Run in a new empty directory, with HOME pointing into it; fail if anything is left in it afterwards."""
    before = Path.cwd(), os.environ.get("HOME")
    with tempfile.TemporaryDirectory(prefix="fuzz-cwd-") as cwd:
        os.chdir(cwd)
        os.environ["HOME"] = cwd
        try:
            yield Path(cwd)
            left = sorted(str(p.relative_to(cwd)) for p in Path(cwd).rglob("*"))
            assert left == [], f"the loader wrote {left}"
        finally:
            os.chdir(before[0])
            if before[1] is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = before[1]


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where mutated specs are written (apart from the cwd that must stay empty); the corpus is loaded once first,
    so the time limit measures the loader, not first imports."""
    for path in CORPUS:
        with contextlib.suppress(SpecError):  # a shipped spec mid-edit elsewhere must not stop the fuzzing
            load_spec(str(path))
    return tmp_path_factory.mktemp("fuzz-specs")


def check_load(spec_dir: Path, name: str, data: bytes, tally: Tally) -> None:
    path = spec_dir / name
    path.write_bytes(data)
    with empty_cwd_and_home():
        start = time.perf_counter()
        try:
            load_spec(str(path))
            outcome = "loaded"
        except SpecError as exc:
            outcome = "SpecError"
            assert str(exc).strip(), "an empty error message"
        except Exception:
            raise AssertionError(f"a mutant of {name} raised instead of a SpecError:\n{traceback.format_exc()}\n"
                                 f"spec bytes: {data!r}") from None
        wall_s = time.perf_counter() - start
    tally.add(outcome, wall_s, name)
    assert wall_s < LOAD_S, f"a mutant of {name} took {wall_s:.2f} s to load: {data[:300]!r}"


BYTES_TALLY, TREE_TALLY, CLI_TALLY = Tally("byte mutants"), Tally("tree mutants"), Tally("CLI --dry-run")


@SETTINGS
@given(mutant=byte_mutants())
def test_byte_mutants_of_shipped_specs_load_or_fail_as_spec_errors(spec_dir: Path, mutant: tuple[str, bytes]) -> None:
    check_load(spec_dir, *mutant, BYTES_TALLY)


@SETTINGS
@given(mutant=tree_mutants())
def test_tree_mutants_of_shipped_specs_load_or_fail_as_spec_errors(spec_dir: Path, mutant: tuple[str, bytes]) -> None:
    check_load(spec_dir, *mutant, TREE_TALLY)


@CLI_SETTINGS
@given(mutant=st.one_of(byte_mutants(), tree_mutants()))
def test_cli_dry_run_of_mutants_exits_0_or_2_without_traceback(spec_dir: Path, mutant: tuple[str, bytes]) -> None:
    from resnet_lab.cli import main

    name, data = mutant
    path = spec_dir / name
    path.write_bytes(data)
    out, err = io.StringIO(), io.StringIO()
    with empty_cwd_and_home(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        start = time.perf_counter()
        try:
            rc: Any = main([str(path), "--dry-run"])
        except SystemExit as exc:
            rc = exc.code
        except Exception:
            rc = f"raised: {traceback.format_exc()}"
        wall_s = time.perf_counter() - start
    CLI_TALLY.add(f"exit {rc}" if isinstance(rc, int) else "raised", wall_s, name)
    assert rc in (0, 2), f"a mutant of {name}: {rc}\n{err.getvalue()}\nspec bytes: {data!r}"
    assert "Traceback" not in err.getvalue() + out.getvalue()
    assert (rc == 2) == bool(err.getvalue().strip()), "an exit 2 without a message, or a message with exit 0"


def test_fuzz_numbers_are_recorded() -> None:
    # Runs after the three above (file order): prints what they tried, for the record (-s shows it).
    for tally in (BYTES_TALLY, TREE_TALLY, CLI_TALLY):
        print(tally.report())
    for tally in (BYTES_TALLY, TREE_TALLY):  # a tally is empty when its test was deselected (-k)
        if tally.outcomes:  # the mutants reached both ends: rejected ones, and valid ones through every rule
            assert tally.outcomes["SpecError"] > 0 and tally.outcomes["loaded"] > 0, tally.report()
