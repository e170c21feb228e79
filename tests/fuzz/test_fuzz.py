"""Bounded coverage-guided fuzzing of the tar scanner (Python and C parsers must agree), the format
readers and `obdconv inspect` (tests/fuzz/README.md). The invariant: every input parses or raises
an ObdconvError subclass; no other exception, no hang (-timeout), no runaway memory (-rss_limit_mb).

Budget: OBDCONV_FUZZ_SECONDS per target (default 4), from the fixed OBDCONV_FUZZ_SEED; set it higher
(and the seed to 0 for a random one) to fuzz longer locally. With
atheris (libFuzzer, coverage-guided) each target runs in its own process, as many at once as there
are CPUs (OBDCONV_FUZZ_JOBS), so the seven take ~30 s on two cores; where atheris does not
install, hypothesis mutates the same seed corpus in this process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
SECONDS = float(os.environ.get("OBDCONV_FUZZ_SECONDS", "4"))
JOBS = int(os.environ.get("OBDCONV_FUZZ_JOBS", "0")) or os.cpu_count() or 2
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
# A fixed seed makes a run explore the same mutation sequence each time (a CI run repeats a prefix of
# what a longer local run with the same seed explored); OBDCONV_FUZZ_SEED=0 lets libFuzzer pick one.
SEED = int(os.environ.get("OBDCONV_FUZZ_SEED", "20261207"))
LIBFUZZER_FLAGS = [f"-seed={SEED}", "-timeout=10", "-rss_limit_mb=2048", "-max_len=65536", "-print_final_stats=1"]


@dataclass
class Run:
    """One target's fuzzing: inputs tried, new coverage units, and the defect found (or "")."""
    inputs: int = 0
    new_units: int = 0
    defect: str = ""


def _run_atheris(target: str, tmp_path: Path) -> Run:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "tests.fuzz.engine", target, str(work), str(CORPUS / target),
           f"-max_total_time={max(int(SECONDS), 1)}", f"-artifact_prefix={tmp_path}/", *LIBFUZZER_FLAGS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=SECONDS + 180)
    out = proc.stdout + proc.stderr
    units = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    new = re.search(r"stat::new_units_added:\s*(\d+)", out)
    run = Run(int(units.group(1)) if units else 0, int(new.group(1)) if new else 0)
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    if proc.returncode != 0 or crashes or units is None:
        shown = crashes[0].read_bytes()[:512].hex() if crashes else "(none saved)"
        run.defect = (f"exit {proc.returncode}; input (hex, first 512 bytes): {shown}\n{out[-4000:]}")
    return run


def _run_hypothesis(target: str) -> Run:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from obdconv.errors import ObdconvError

    seeds = [p.read_bytes() for p in sorted((CORPUS / target).iterdir())]

    def mutate(seed: bytes) -> st.SearchStrategy[bytes]:
        def apply(edit: tuple[int, bytes, int]) -> bytes:
            pos, piece, how = edit
            pos %= len(seed) + 1
            return [seed[:pos] + piece + seed[pos + len(piece):], seed[:pos] + piece + seed[pos:],
                    seed[:pos] + seed[pos + len(piece) + 1:], seed[:pos]][how]
        return st.tuples(st.integers(0, 1 << 20), st.binary(max_size=16), st.integers(0, 3)).map(apply)

    strategy = st.one_of(st.binary(max_size=4096), st.sampled_from(seeds).flatmap(mutate))
    fn = TARGETS[target]
    count = 0

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            fn(data)
        except ObdconvError:
            pass

    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        one()  # a failing input fails the test with hypothesis's shrunk example
    return Run(count)


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every target fuzzed once per session, JOBS processes at a time."""
    if not HAVE_ATHERIS:
        return {}
    base = tmp_path_factory.mktemp("fuzz")
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {t: pool.submit(_run_atheris, t, base / t) for t in sorted(TARGETS)}
        return {t: f.result() for t, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target: str, fuzz_runs: dict[str, Run], record_property: pytest.RecordProperty) -> None:
    run = fuzz_runs[target] if HAVE_ATHERIS else _run_hypothesis(target)
    record_property("inputs_tried", run.inputs)
    record_property("new_coverage_units", run.new_units)
    print(f"fuzz {target}: {run.inputs} inputs, {run.new_units} new coverage units, "
          f"{'atheris' if HAVE_ATHERIS else 'hypothesis'}, {SECONDS:g} s")
    assert not run.defect, f"fuzz target {target} found a defect: {run.defect}"
    assert run.inputs > 0


def test_seed_corpus_is_small_and_every_seed_keeps_the_invariant() -> None:
    """The seeds live in the repository: small files only; each one passes its target's check."""
    from obdconv.errors import ObdconvError

    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(TARGETS)
    for target, fn in TARGETS.items():
        seeds = sorted((CORPUS / target).iterdir())
        assert seeds, target
        for seed in seeds:
            assert seed.stat().st_size <= 32 * 1024, seed
            try:
                fn(seed.read_bytes())
            except ObdconvError:
                pass
