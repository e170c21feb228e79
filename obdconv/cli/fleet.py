"""`obdconv submit | status | wait | worker | fleet`: the fleet's command line.

* submit: the `convert` flags (the shared definitions obdconv.cli.convert.add_arguments /
  build_request; a fallback set below when that module is absent) plus `--credential-ref` and
  `--callback-url URL --callback-secret-ref REF` (a signed POST when the request ends, tasks/README.md).
  `-u user:password` is refused: secrets stay on the workers. `--db-*` are ignored: workers use
  their own database settings;
  prints the request id; `--wait` follows progress until the end.
* status ID / wait ID: the durable status merged with live progress; `--json` for machines.
  wait exits 0 on success, the error class's exit code on failure, 79 on a PARTIAL result (some
  format could not be built, the others were: see `PartialResultError`), 75 on timeout.
* worker: a Celery worker of the fleet (= `celery -A workers worker` with the fleet's queues).
* flower: Flower for the fleet's app (= `celery -A workers flower`, without importing from the
  working directory).
* fleet: Redis + database + N workers + Flower on this machine, converts a sample image (built
  on the fly into an OCI layout), prints the result and the Flower URL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from obdconv import errors
from obdconv.request import ConversionRequest, RegistryAccess

EXIT_TIMEOUT = 75


def _shared_request_helpers() -> tuple[Any, Any] | None:
    try:
        from obdconv.cli import convert
    except ImportError:
        return None
    add = getattr(convert, "add_arguments", None)
    build = getattr(convert, "build_request", None)
    return (add, build) if add and build else None


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """The conversion flags (the reference convertor's names, spec reference-convertor.md §1)."""
    p.add_argument("-r", "--repository", required=True, help="host[:port]/name or oci:PATH")
    p.add_argument("-i", "--input-tag", default="")
    p.add_argument("-g", "--input-digest", default="")
    p.add_argument("-o", "--output-tag", default="", help="overlaybd tag when neither output flag is given")
    p.add_argument("--overlaybd", default="", help="tag for the overlaybd output")
    p.add_argument("--turboOCI", "--fastoci", dest="turbo", default="", help="tag for the turboOCI output")
    p.add_argument("--output-repository", default="")
    p.add_argument("--oci", action="store_true")
    p.add_argument("--referrer", action="store_true")
    p.add_argument("--mkfs", default=True, type=lambda s: s.lower() not in ("false", "0", "no"))
    p.add_argument("--vsize", type=int, default=64)
    p.add_argument("--fstype", default="ext4")
    p.add_argument("--algorithm", default="lz4", choices=["lz4", "zstd"])
    p.add_argument("--bs", type=int, default=4096)
    p.add_argument("--platform", action="append", default=[])
    p.add_argument("--concurrency-limit", type=int, default=4)
    p.add_argument("--no-upload", action="store_true")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--credential-ref", default="",
                   help="name of credentials configured on the workers (never the secret itself)")


def request_from_args(args: argparse.Namespace) -> ConversionRequest:
    request = _request_from_args(args)
    request.callback_url = getattr(args, "callback_url", "") or ""
    request.callback_secret_ref = getattr(args, "callback_secret_ref", "") or ""
    return request


def _request_from_args(args: argparse.Namespace) -> ConversionRequest:
    if getattr(args, "username", ""):
        raise errors.UsageError("submit does not send passwords; configure them on the workers and "
                                "pass --credential-ref")
    helpers = _shared_request_helpers()
    if helpers is not None:
        request: ConversionRequest = helpers[1](args)
        request.access.credential_ref = args.credential_ref or request.access.credential_ref
        request.db_type, request.db_str_ref = "", ""  # the workers' own database settings apply
        return request
    overlaybd = args.overlaybd or ("" if args.turbo else args.output_tag)
    return ConversionRequest(
        repository=args.repository, input_tag=args.input_tag if not args.input_digest else "",
        input_digest=args.input_digest, overlaybd_tag=overlaybd, turbo_tag=args.turbo,
        output_repository=args.output_repository, oci=args.oci, referrer=args.referrer, mkfs=args.mkfs,
        vsize_gb=args.vsize, fstype=args.fstype, algorithm=args.algorithm, block_size=args.bs,
        platforms=list(args.platform), concurrency_limit=args.concurrency_limit, no_upload=args.no_upload,
        access=RegistryAccess(plain=args.plain, insecure=args.insecure, credential_ref=args.credential_ref),
    )


def format_status(s: dict[str, Any]) -> str:
    lines = [f"{s['request_id']}: {s['state']}" + (f" ({s['stage']})" if s.get("stage") else "")]
    for key, p in sorted((s.get("progress") or {}).items()):
        total = p.get("total") or 0
        pct = f"{100 * p['done'] / total:.0f}%" if total else "-"
        lines.append(f"  {key:<80} {pct:>5} on {p.get('host', '?')}")
    for fmt, out in sorted((s.get("outputs") or {}).items()):
        if out.get("error"):  # a PARTIAL request's format that could not be built
            lines.append(f"  {fmt}: {out.get('tag') or '(by digest)'} not built: {out['error'].get('class')}: "
                         f"{out['error'].get('message')}")
            continue
        lines.append(f"  {fmt}: {out.get('tag') or '(by digest)'} {out.get('digest')}")
    if s.get("error"):
        lines.append(f"  error: {s['error']['class']}: {s['error']['message']}")
    callback = s.get("callback")
    if callback:
        lines.append(f"  callback: {callback['state']} after {callback['attempts']} attempt(s)"
                     + (f": {callback['error']}" if callback.get("error") else ""))
    return "\n".join(lines)


def _exit_code(s: dict[str, Any]) -> int:
    if s["state"] == "SUCCESS":
        return 0
    if s["state"] == "PARTIAL":
        return errors.PartialResultError.exit_code
    if s["state"] not in ("FAILURE", "REVOKED", "CANCELLED"):
        return EXIT_TIMEOUT
    cls = getattr(errors, (s.get("error") or {}).get("class", ""), None)
    return cls.exit_code if isinstance(cls, type) and issubclass(cls, errors.ObdconvError) else 70


def _follow(request_id: str, timeout: float | None, as_json: bool) -> int:
    from obdconv.client import wait

    last = [""]

    def show(s: dict[str, Any]) -> None:
        text = format_status(s)
        if not as_json and text != last[0]:
            print(text, file=sys.stderr, flush=True)
            last[0] = text

    final = wait(request_id, timeout, on_progress=show)
    if as_json:
        print(json.dumps(final, indent=2, sort_keys=True))
    else:
        print(format_status(final), flush=True)  # the result goes to stdout (progress went to stderr)
    return _exit_code(final)


def cmd_submit(args: argparse.Namespace) -> int:
    from obdconv.client import submit

    request_id = submit(request_from_args(args))
    print(request_id, flush=True)
    return _follow(request_id, args.timeout, args.json) if args.wait else 0


def cmd_status(args: argparse.Namespace) -> int:
    from obdconv.client import status

    s = status(args.request_id)
    print(json.dumps(s, indent=2, sort_keys=True) if args.json else format_status(s))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return _follow(args.request_id, args.timeout, args.json)


def worker_argv(queues: str, concurrency: int, hostname: str, loglevel: str, pool: str) -> list[str]:
    argv = ["worker", "--queues", queues, "--hostname", hostname, "--loglevel", loglevel, "--pool", pool,
            "--events"]
    if concurrency > 0:
        argv += ["--concurrency", str(concurrency)]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.app import app, settings_of

    concurrency = args.concurrency or settings_of(app).worker_concurrency
    app.worker_main(worker_argv(args.queues, concurrency, args.hostname, args.loglevel, args.pool))
    return 0


def flower_argv(address: str, port: int, basic_auth: str = "") -> list[str]:
    """`celery flower` arguments; `--conf` names no file, or Flower would execute the working
    directory's `flowerconfig.py` (see obdconv/interpreter.py)."""
    import os

    argv = ["flower", f"--address={address}", f"--port={port}", f"--conf={os.devnull}"]
    return argv + ([f"--basic-auth={basic_auth}"] if basic_auth else [])


def cmd_flower(args: argparse.Namespace) -> int:
    from workers.app import app

    # The app object itself, not `celery -A workers`: Celery imports an -A app with the working
    # directory first on sys.path.
    return int(app.start(flower_argv(args.address, args.port, args.basic_auth)) or 0)


def cmd_fleet(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from workers.localfleet import LocalFleet
    from workers.sample_image import build_sample_image

    directory = Path(args.dir or tempfile.mkdtemp(prefix="obdconv-fleet-"))
    fleet = LocalFleet(directory, workers=args.workers, concurrency=args.concurrency,
                       flower_user=args.flower_user, flower_password=args.flower_password)
    print(f"fleet directory: {directory}", flush=True)
    fleet.start()
    try:
        os.environ.update(fleet.env())
        # The client reads its settings from the environment the fleet just defined.
        from config.settings import load_settings
        from workers.app import app

        app.obdconv_settings = load_settings()  # type: ignore[attr-defined]
        app.conf.broker_url = fleet.env()["OBDCONV_BROKER_URL"]
        app.conf.result_backend = fleet.env()["OBDCONV_RESULT_BACKEND"]
        print(f"flower: {fleet.flower_url()}/", flush=True)
        print("to use this fleet from another shell:", flush=True)
        for name, value in fleet.env().items():
            print(f"  export {name}={value}", flush=True)
        layout = directory / "images"
        build_sample_image(layout, "sample", layers=args.layers)
        request = ConversionRequest(f"oci:{layout}", input_tag="sample", overlaybd_tag="sample-obd")
        from obdconv.client import submit

        started = time.monotonic()
        request_id = submit(request)
        print(f"submitted {request_id}", flush=True)
        code = _follow(request_id, args.timeout, False)
        print(f"converted in {time.monotonic() - started:.1f}s", flush=True)
        if code == 0:  # read the result back and compare its filesystem with the source image
            import subprocess

            from obdconv.interpreter import python_command

            code = subprocess.run(python_command("-m", "obdconv", "verify", f"oci:{layout}:sample-obd",
                                                 "--source", f"oci:{layout}:sample")).returncode
        if args.keep_running and code == 0:
            print("fleet running; Ctrl-C stops it", flush=True)
            while True:
                time.sleep(3600)
        return code
    finally:
        fleet.stop()


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("submit", help="send a conversion to the fleet; prints its request id")
    helpers = _shared_request_helpers()
    if helpers is not None:
        helpers[0](p)
        if not any(a.dest == "credential_ref" for a in p._actions):
            p.add_argument("--credential-ref", default="")
    else:
        add_request_arguments(p)
    existing = {opt for a in p._actions for opt in a.option_strings}
    p.add_argument("--callback-url", default="",
                   help="http(s) URL the fleet POSTs a signed JSON summary to when the request ends")
    p.add_argument("--callback-secret-ref", default="",
                   help="name of the HMAC key configured on the workers (never the key itself)")
    p.add_argument("--wait", action="store_true", help="follow progress until the conversion ends")
    p.add_argument("--timeout", type=float, default=None)
    if "--json" not in existing:  # the convert flags may already define it (same meaning)
        p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="state, progress and outputs of a request")
    p.add_argument("request_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("wait", help="wait for a request to finish")
    p.add_argument("request_id")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wait)

    p = subparsers.add_parser("worker", help="start a fleet worker (Celery)")
    p.add_argument("--queues", default="control,prepare,metadata,assemble",
                   help="shared queues to consume (its own worker.<hostname> queue is always added)")
    p.add_argument("--concurrency", type=int, default=0, help="pool processes (0: settings / CPU count)")
    p.add_argument("--hostname", default="obdconv@%h", help="node name, e.g. w1@%%h")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--pool", default="prefork")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("flower", help="run Flower for the fleet (= celery -A workers flower, safely)")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--basic-auth", default="", help="user:password (or FLOWER_BASIC_AUTH in the environment)")
    p.set_defaults(func=cmd_flower)

    p = subparsers.add_parser("fleet", help="run a local fleet (Redis, workers, Flower) and convert a sample image")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dir", default="", help="fleet directory (logs, spool, database); default a new temp dir")
    p.add_argument("--flower-user", default="admin")
    p.add_argument("--flower-password", default="obdconv")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--keep-running", action="store_true")
    p.set_defaults(func=cmd_fleet)
