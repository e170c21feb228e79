"""One local conversion in its own process (for "two conversions at once" tests):
`python -m tests.dedup.convert_worker REPOSITORY TAG OUT_TAG DB_TYPE DB_STR WORKDIR START_AT`.
Prints a JSON object: {"prepared": [source layer digests prepared], "root": converted root digest}."""

from __future__ import annotations

import json
import sys
import time

from obdconv.pipeline.runner import ProgressEvent, RunnerOptions, convert
from obdconv.request import ConversionRequest, RegistryAccess


def main(argv: list[str]) -> int:
    repository, tag, out_tag, db_type, db_str, workdir, start_at = argv
    prepared: list[str] = []

    def progress(e: ProgressEvent) -> None:
        if e.stage == "prepare" and e.finished:
            prepared.append(e.layer_digest)

    request = ConversionRequest(repository=repository, input_tag=tag, overlaybd_tag=out_tag, workdir=workdir,
                                access=RegistryAccess(plain=True), db_type=db_type, db_str_ref="test")
    time.sleep(max(0.0, float(start_at) - time.time()))
    result = convert(request, options=RunnerOptions(workers=1, db_str=db_str), progress=progress)
    print(json.dumps({"prepared": prepared, "root": result.output("native").root_digest}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
