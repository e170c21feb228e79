"""`obdconv verify REF --source SRC_REF`: read a converted image back and compare it with its source.

Exit 0 when every platform present in both images verifies; 65 (BadInputError) with a readable
report otherwise. `--json` prints the machine-readable report on stdout instead of the text one.
`--source` is required: a native overlaybd image keeps no link to its source image (see
obdconv/verify.py).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify", help="verify a converted overlaybd/turboOCI image against its source",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", metavar="REF", help="converted image: host[:port]/repo:tag, oci:PATH:tag, or ...@sha256:...")
    p.add_argument("--source", "-s", required=True, metavar="SRC_REF", help="the source image it was converted from")
    p.add_argument("--mount", action="store_true",
                   help="read the filesystem through the kernel (mount -o loop,ro; needs root) instead of libext2fs")
    p.add_argument("--platform", default="", metavar="OS/ARCH[/VARIANT]", help="verify only this platform of an index")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workdir", default=None, help="where blobs and the flattened image are spooled (default: $TMPDIR)")
    reg = p.add_argument_group("registry access (as for convert)")
    reg.add_argument("-u", "--username", default="", help="user:password")
    reg.add_argument("--plain", action="store_true", help="use http:// for every registry")
    reg.add_argument("--insecure", action="store_true", help="skip TLS certificate verification")
    reg.add_argument("--root-ca", action="append", default=[], help="extra root CA PEM file (repeatable)")
    reg.add_argument("--cert-dir", action="append", default=[], help="directory of *.crt / *.cert+*.key (repeatable)")
    reg.add_argument("--client-cert", action="append", default=[], help="certfile:keyfile (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so `obdconv --help` does not load the format and filesystem readers.
    from obdconv.registry.options import RegistryOptions, split_client_cert
    from obdconv.verify import raise_for_report, verify_reference

    for value in args.client_cert:
        split_client_cert(value)  # UsageError naming the bad value before any network traffic
    options = RegistryOptions.from_flags(
        args.username, plain=args.plain, insecure=args.insecure, root_ca=list(args.root_ca),
        cert_dir=list(args.cert_dir), client_cert=list(args.client_cert))
    report = verify_reference(args.ref, args.source, options, platform=args.platform or None,
                              mount=args.mount, workdir=args.workdir)
    if args.json:
        print(report.to_json())
    else:
        print(report.format_text())
    sys.stdout.flush()
    raise_for_report(report)
    return 0
