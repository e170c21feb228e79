"""`obdconv convert`: the reference convertor's flags (spec reference-convertor.md §1), run locally.

Same names, meanings and defaults as the reference; bool flags also take `--flag=false`. Extras:
`-r oci:PATH` (an OCI image layout), `--output-repository`, `--platform` (repeatable),
`--json` (the result on stdout), `--algorithm`/`--bs` (ZFile codec and block size in KiB, like
`overlaybd-commit --bs`), `--db-required`, `--workers`, `--base-layer PATH` (the base layer
`--mkfs=false` stacks on; default /opt/overlaybd/baselayers/ext4_64), `--flatten` (the overlaybd
output as ONE layer holding the final filesystem), `--all-or-nothing`.

Partial results: when the image cannot become one of the requested formats (turboOCI with a
zstd-compressed layer), the others are still converted and pushed, the result names the missing
one and why, and the exit code is 79 (`PartialResultError`); `--all-or-nothing` fails the whole
request instead (exit 69), nothing converted or pushed.

Differences on purpose: an error exits non-zero with the class's exit code (the reference exits 0
on flag errors); `--fstype erofs` fails with a clear "not supported"; `--vsize` is ignored with
`--mkfs=false` (the base layer's size applies, as in the reference);
`--no-upload` pushes nothing at all (the reference still pushes turbo layers and indexes);
`--disable-sparse` is accepted and has no effect (no sparse RW files are involved); `--db-type`
also takes `sqlite` (`--db-str PATH`); dedup also covers turboOCI; an `oci:PATH` target gets OCI
media types unless `--oci=false` (skopeo and podman see no Docker-typed image in a layout).

Temporary data under `--dir`: `spool/` (prepared layers; removed at the end unless `--reserve`)
and one metadata work directory per manifest; `--dir` and `spool/` themselves are removed when the
run made them and leaves them empty. Ctrl-C, SIGTERM and SIGHUP remove it all too (exit 130, 143,
129); after a SIGKILL the next run in the same `--dir` removes what the killed one left. `--dump-manifest` writes
`<dir>/<format>/<os_arch>-<manifest hex>/{config,manifest}.json` and `<dir>/<format>/index.json`
(per format, so `--overlaybd` and `--turboOCI` together do not overwrite each other), and keeps them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from obdconv.errors import PartialResultError, UsageError
from obdconv.pipeline.validate import validate_request
from obdconv.registry.options import RegistryOptions
from obdconv.request import ConversionRequest, RegistryAccess

if TYPE_CHECKING:  # the runner pulls in every library; import it only when converting
    from obdconv.pipeline.runner import ConversionResult, ProgressEvent

log = logging.getLogger(__name__)

KNOWN_DB_TYPES = ("mysql", "sqlite")


def parse_bool(value: str) -> bool:
    """Go's strconv.ParseBool, which cobra uses for `--flag=value`."""
    v = value.strip()
    if v in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if v in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r}")


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool | None, help_text: str) -> None:
    p.add_argument(name, nargs="?", const=True, default=default, type=parse_bool, metavar="BOOL", help=help_text)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("convert", help="convert an image to overlaybd / turboOCI on this machine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--repository", required=True,
                   help="repository incl. registry host (e.g. localhost:5000/redis) or oci:PATH")
    p.add_argument("-u", "--username", default="", help="user:password (split at the first ':')")
    p.add_argument("-i", "--input-tag", default="", help="tag of the source image")
    p.add_argument("-g", "--input-digest", default="", help="digest of the source image (the tag wins)")
    p.add_argument("-o", "--output-tag", default="",
                   help="native output tag when none of --overlaybd/--turboOCI/--fastoci is given")
    p.add_argument("-d", "--dir", default="tmp_conv", help="directory for temporary data (default tmp_conv)")
    _bool_flag(p, "--oci", None, "emit OCI media types (else Docker schema 2); default: true for an oci:PATH "
               "target (skopeo and podman see no Docker-typed image in a layout), false for a registry")
    p.add_argument("--fstype", default="ext4", help="filesystem of turboOCI layers (only ext4 is supported)")
    _bool_flag(p, "--mkfs", True, "create the filesystem in layer 0 (false: stack the image on --base-layer)")
    p.add_argument("--vsize", type=int, default=64, help="virtual block device size in GB (default 64)")
    p.add_argument("--fastoci", default="", help="deprecated alias of --turboOCI")
    p.add_argument("--turboOCI", dest="turbo_oci", default="", help="output tag for overlaybd-turboOCI")
    p.add_argument("--overlaybd", default="", help="output tag for overlaybd (native)")
    p.add_argument("--db-str", default="", help="dedup database DSN, e.g. user:pass@tcp(127.0.0.1:3306)/db")
    p.add_argument("--db-type", default="", help="dedup database type: mysql (or sqlite); empty = no dedup")
    p.add_argument("--concurrency-limit", type=int, default=4, help="manifests converted at once (<= 0: all)")
    _bool_flag(p, "--disable-sparse", False, "accepted for compatibility (output is never a sparse RW file)")
    _bool_flag(p, "--referrer", False, "add subject + artifactType pointing at the source (forces --oci)")
    p.add_argument("--cert-dir", action="append", default=[], help="directory of *.crt / *.cert+*.key")
    p.add_argument("--root-ca", action="append", default=[], help="extra root CA PEM file")
    p.add_argument("--client-cert", action="append", default=[], help="client certificate certfile:keyfile")
    _bool_flag(p, "--insecure", False, "skip TLS verification")
    _bool_flag(p, "--plain", False, "use http:// for every registry")
    _bool_flag(p, "--reserve", False, "keep temporary data (prepared layers, metadata images)")
    _bool_flag(p, "--no-upload", False, "convert but push nothing")
    _bool_flag(p, "--dump-manifest", False, "write produced config/manifest/index JSON under --dir")
    _bool_flag(p, "--verbose", False, "debug logging")
    # obdconv extras
    p.add_argument("--output-repository", default="", help="write the result to another repository")
    p.add_argument("--platform", action="append", default=[], help="only these platforms of an index (os/arch[/variant])")
    _bool_flag(p, "--json", False, "print the result as JSON on stdout")
    p.add_argument("--algorithm", default="lz4", choices=("lz4", "zstd"), help="ZFile block codec (default lz4)")
    p.add_argument("--bs", type=int, default=4, help="ZFile block size in KiB, 4..32, power of two (default 4)")
    _bool_flag(p, "--db-required", False, "fail instead of converting without dedup when the database is down")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: cpu count; 1 = none)")
    p.add_argument("--base-layer", default="",
                   help="with --mkfs=false: the overlaybd base layer file (default /opt/overlaybd/baselayers/ext4_64)")
    _bool_flag(p, "--flatten", False, "overlaybd output as ONE layer holding the whole filesystem (not turboOCI)")
    _bool_flag(p, "--all-or-nothing", False,
               "fail as a whole when one requested format cannot be built (default: deliver the others)")


def build_request(args: argparse.Namespace) -> ConversionRequest:
    """Flags -> request, with the reference's precedence rules (spec §1, §10.25)."""
    turbo_tag = args.turbo_oci or args.fastoci
    overlaybd_tag = args.overlaybd
    if not (overlaybd_tag or turbo_tag):
        overlaybd_tag = args.output_tag  # -o only counts when no format-specific tag is given
    db_type = args.db_type
    if db_type and db_type not in KNOWN_DB_TYPES:
        log.warning("db-type %s is not one of known db types", db_type)
        log.warning("falling back to no deduplication")
        db_type = ""
    if db_type and not args.db_str:
        log.warning("no db-str given, falling back to no deduplication")
        db_type = ""
    block_size = args.bs * 1024
    return ConversionRequest(
        repository=args.repository,
        input_tag=args.input_tag,
        input_digest=args.input_digest,
        overlaybd_tag=overlaybd_tag,
        turbo_tag=turbo_tag,
        output_repository=args.output_repository,
        oci=True if args.referrer else args.oci,  # None: validate_request decides
        referrer=args.referrer,
        mkfs=args.mkfs,
        vsize_gb=args.vsize,
        fstype=args.fstype,
        algorithm=args.algorithm,
        block_size=block_size,
        disable_sparse=args.disable_sparse,
        platforms=list(args.platform),
        concurrency_limit=args.concurrency_limit,
        no_upload=args.no_upload,
        dump_manifest=args.dump_manifest,
        reserve=args.reserve,
        workdir=args.dir,
        db_type=db_type,
        db_str_ref="cli" if db_type else "",
        db_required=args.db_required,
        base_layer=args.base_layer,
        flatten=args.flatten,
        all_or_nothing=args.all_or_nothing,
        access=RegistryAccess(plain=args.plain, insecure=args.insecure, root_ca=list(args.root_ca),
                              cert_dir=list(args.cert_dir), client_cert=list(args.client_cert)),
    )


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    return RegistryOptions.from_flags(args.username, plain=args.plain, insecure=args.insecure,
                                      root_ca=list(args.root_ca), cert_dir=list(args.cert_dir),
                                      client_cert=list(args.client_cert))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressPrinter:
    """Per-layer bars with bytes/s and stage on a TTY (redrawn in place), plain lines otherwise."""

    BAR = 24

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.layers: dict[str, list[Any]] = {}  # digest -> [index, stage, done, total, started, download end]
        self.lines_drawn = 0
        self.stage = ""
        self.last_draw = 0.0

    def __call__(self, e: ProgressEvent) -> None:
        if e.layer_digest:
            row = self.layers.setdefault(e.layer_digest, [e.layer_index, e.stage, 0, 0, time.monotonic(), 0.0])
            row[1] = e.stage + (" done" if e.finished else "")
            if e.stage == "prepare":  # bytes are the source blob's; later stages report 1/1
                row[2], row[3] = max(row[2], e.done), max(row[3], e.total)
                if e.finished:
                    row[5] = time.monotonic()
        self.stage = e.stage
        if self.tty:
            if e.finished or time.monotonic() - self.last_draw > 0.1:
                self._draw()
        elif e.finished or not e.layer_digest:
            what = f" layer {e.layer_index} {e.layer_digest[:19]}" if e.layer_digest else ""
            where = f" [{e.format}]" if e.format else ""
            manifest = f" manifest {e.manifest[:19]}" if e.manifest else ""
            state = "done" if e.finished else "started"
            print(f"{e.stage}{where}{manifest}{what}: {state}", file=self.stream, flush=True)

    def _draw(self) -> None:
        self.last_draw = time.monotonic()
        out = []
        for digest, (index, stage, done, total, started, ended) in sorted(self.layers.items(), key=lambda kv: kv[1][0]):
            frac = done / total if total else (1.0 if stage.endswith("done") else 0.0)
            filled = int(frac * self.BAR)
            rate = done / max((ended or time.monotonic()) - started, 1e-3)
            out.append(f"layer {index:>3} {digest[7:19]} [{'#' * filled}{'.' * (self.BAR - filled)}] "
                       f"{_human(done):>10} / {_human(total):<10} {_human(rate)}/s  {stage}")
        out.append(f"stage: {self.stage}")
        if self.lines_drawn:
            self.stream.write(f"\x1b[{self.lines_drawn}F")
        self.stream.write("".join(f"\x1b[2K{line}\n" for line in out))
        self.stream.flush()
        self.lines_drawn = len(out)


FORMAT_NAMES = {"native": "overlaybd", "turbo": "turboOCI"}


def print_result(result: ConversionResult, request: ConversionRequest, stream: TextIO) -> None:
    for out in result.outputs:
        target = out.repository
        if out.error:
            print(f'{FORMAT_NAMES.get(out.format, out.format)} output "{target}:{out.tag}" not built: '
                  f'{out.error["class"]}: {out.error["message"]}', file=stream)
            continue
        print(f'converted to "{target}:{out.tag}", digest: "{out.root_digest}"'
              + ("" if result.uploaded else " (not uploaded: --no-upload)"), file=stream)


def run(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    request = build_request(args)
    if args.bs <= 0:
        raise UsageError(f"--bs {args.bs}: expected KiB, 4..32")
    validate_request(request)  # fail on bad flags before anything heavy is imported or opened
    from obdconv.pipeline.forkserver import pool_size, start_early

    if pool_size(args.workers) > 1:
        start_early()  # the pool's fork server imports the pipeline while this process does
    from obdconv.pipeline.runner import RunnerOptions, convert

    options = RunnerOptions(registry=registry_options(args), workers=args.workers, db_str=args.db_str)
    progress = ProgressPrinter(sys.stderr)
    result = convert(request, options=options, progress=progress)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_result(result, request, sys.stdout)
    return PartialResultError.exit_code if result.partial else 0
