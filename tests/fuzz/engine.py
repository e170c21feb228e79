"""Run one fuzz target under atheris (coverage-guided, libFuzzer) until its time budget ends:

    python -m tests.fuzz.engine TARGET WORK_CORPUS SEED_CORPUS [libFuzzer flags...]

obdconv's modules are imported instrumented, so libFuzzer sees which branches an input reached.
An input that raises an `ObdconvError` is fine; any other exception (or a hang past -timeout, or
memory past -rss_limit_mb) makes libFuzzer save the input and exit non-zero. New inputs go to
WORK_CORPUS (a temporary directory), never into the seeds kept in the repository.
"""

from __future__ import annotations

import logging
import sys

import atheris

with atheris.instrument_imports(include=["obdconv"]):
    from obdconv.errors import ObdconvError
    from tests.fuzz.targets import TARGETS


def main() -> None:
    target = TARGETS[sys.argv[1]]
    logging.disable(logging.CRITICAL)  # e.g. the tar scanner's warning per socket: noise at 10^4 inputs/s

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except ObdconvError:
            pass  # bad input, reported as such: what the invariant allows

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
