"""Build the 3 GB-class benchmark image: one dominant layer, generated deterministically.

Layers (gzip tars, OCI media types):
  1. base   ~120 MB, ~6k entries: a small distribution-like tree;
  2. big    ~2.8 GB, ~75k entries: a package tree with the size mix of real images (mostly small
            files, a long tail, a few files of 50-300 MB), the layer the conversion waits for;
  3. top    ~60 MB: overwrites some files, adds new ones, whiteouts and an opaque directory.

File contents come from seeded generators, not from this machine, so every machine builds the same
tars (the gzip blobs depend only on the pigz version): text (source-code-like words; deflate ~4x),
binary (machine-code-like byte snippets; ~2.5x), random (already compressed data; 1x) and sparse
(mostly zeros). A file takes a slice of its kind's corpus at a seeded offset; the corpora are
larger than any deflate or LZ4 window, so a file compresses like its kind, not like a repeat.

Cached under benchmarks/.cache/big (an OCI layout at benchmarks/.cache/big/image, tag `big`;
`big/image.json` summarises it); a second run only checks the blobs are there.

Usage: python benchmarks/build_big_image.py [--cache DIR] [--scale F]   (F < 1 builds a smaller
image with the same mix, e.g. 0.1 for a quick try; it is cached separately)
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import random
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_image  # noqa: E402  (benchmarks/ is not a package)

TAG = "big"
SEED = 20240614
CORPUS_BYTES = 24 << 20  # per kind; far beyond deflate's 32 KiB window and LZ4's 64 KiB
MTIME = build_image.SOURCE_DATE_EPOCH

# (kind, share of the bytes of ordinary files) and the file name suffixes that go with a kind.
KINDS = {"text": (".py", ".txt", ".json", ".h", ".html"), "binary": (".so", ".o", ".pyc", ""),
         "random": (".gz", ".png", ".whl", ".jpg"), "sparse": (".img", ".db")}
KIND_WEIGHTS = {"text": 0.50, "binary": 0.33, "random": 0.09, "sparse": 0.08}
# The big layer's very large files: (path, kind, MiB), ~1.1 GB together.
LARGE_FILES = [("opt/model/weights-00001-of-00002.bin", "random", 180),
               ("opt/model/weights-00002-of-00002.bin", "binary", 160),
               ("usr/lib/x86_64-linux-gnu/libhuge_runtime.so.12", "binary", 300),
               ("usr/share/dataset/corpus.jsonl", "text", 250),
               ("var/lib/app/cache.db", "sparse", 120),
               ("usr/lib/x86_64-linux-gnu/libcuda_like.so.1", "binary", 60),
               ("usr/share/dataset/labels.csv", "text", 50)]


def log(msg: str) -> None:
    build_image.log(msg)


# ---------------------------------------------------------------------------------------------- corpora


def _zipf_picker(rng: random.Random, n: int, exponent: float) -> Callable[[], int]:
    cumulative = list(itertools.accumulate(1.0 / (i + 1) ** exponent for i in range(n)))
    top = cumulative[-1]
    return lambda: bisect.bisect(cumulative, rng.random() * top)


def _text_corpus(rng: random.Random, size: int) -> bytes:
    # Source code and text repeat words and whole line shapes: lines are drawn (Zipf) from a pool
    # of template lines over a Zipf vocabulary, a third of them with one word changed.
    letters = "abcdefghijklmnopqrstuvwxyz_"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(2500)]
    word = _zipf_picker(rng, len(vocab), 1.1)
    punct = [" ", " ", " ", ", ", "(", ")", ".", " = ", ": ", '"', "[", "]"]
    templates = []
    for _ in range(4000):
        indent = "    " * rng.choice((0, 0, 1, 1, 2, 3))
        words = [vocab[word()] + rng.choice(punct) for _ in range(rng.randint(1, 9))]
        templates.append(indent + "".join(words).rstrip())
    line = _zipf_picker(rng, len(templates), 0.9)
    out: list[str] = []
    n = 0
    while n < size:
        text = templates[line()]
        if rng.random() < 0.33:
            text = text.replace(text.split()[0] if text.split() else "", vocab[word()], 1)
        out.append(text)
        n += len(text) + 1
    return "\n".join(out).encode()[:size]


def _binary_corpus(rng: random.Random, size: int) -> bytes:
    # Machine code repeats short instruction sequences and small constants: snippets of 2-24 bytes
    # (Zipf-chosen), now and then a few random bytes (addresses) and zero runs (padding, tables).
    snippets = [rng.randbytes(rng.randint(2, 24)) for _ in range(1500)]
    snippets += [bytes(rng.randint(4, 32)) for _ in range(100)]
    rng.shuffle(snippets)
    pick = _zipf_picker(rng, len(snippets), 1.1)
    out = bytearray()
    while len(out) < size:
        for _ in range(4096):
            out += snippets[pick()]
            if rng.random() < 0.12:
                out += rng.randbytes(rng.randint(1, 4))
    return bytes(out[:size])


def _sparse_corpus(rng: random.Random, size: int) -> bytes:
    out = bytearray(size)
    for off in range(0, size, 4096):
        if rng.random() < 0.12:
            n = rng.randint(64, 4096)
            out[off:off + n] = rng.randbytes(n)
    return bytes(out)


def corpora(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"text": _text_corpus(rng, CORPUS_BYTES), "binary": _binary_corpus(rng, CORPUS_BYTES),
            "random": rng.randbytes(CORPUS_BYTES), "sparse": _sparse_corpus(rng, CORPUS_BYTES)}


class CorpusReader:
    """`size` bytes of a corpus from `offset` on, wrapping around (what tarfile reads a file from)."""

    def __init__(self, corpus: bytes, offset: int, size: int) -> None:
        self.view = memoryview(corpus)
        self.pos = offset % len(corpus)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        parts = []
        while n:
            take = min(n, len(self.view) - self.pos)
            parts.append(self.view[self.pos:self.pos + take])
            self.pos = (self.pos + take) % len(self.view)
            self.left -= take
            n -= take
        return b"".join(parts)


# ---------------------------------------------------------------------------------------------- trees


class Member:
    """One tar member to write: a TarInfo and, for regular files, where its bytes come from."""

    __slots__ = ("info", "kind", "offset")

    def __init__(self, info: tarfile.TarInfo, kind: str = "", offset: int = 0) -> None:
        self.info, self.kind, self.offset = info, kind, offset


def _info(name: str, kind: bytes, size: int = 0, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = size
    ti.mode = mode
    ti.mtime = MTIME
    ti.linkname = link
    return ti


def _file_size(rng: random.Random, scale_cap: int) -> int:
    """Ordinary files: lognormal around 3 KiB with a long tail, 2 % empty, some exact block multiples."""
    r = rng.random()
    if r < 0.02:
        return 0
    if r < 0.06:
        return 4096 * rng.randint(1, 16)
    return min(int(rng.lognormvariate(8.0, 1.9)), scale_cap)


def generate_tree(rng: random.Random, prefix: str, files: int, target_bytes: int, large: list[tuple[str, str, int]],
                  dirs_per_level: tuple[int, ...] = (8, 6, 5, 4)) -> list[Member]:
    """A sorted tree of about `files` regular files (plus dirs, symlinks, hard links) holding about
    `target_bytes` in ordinary files, plus the `large` files."""
    kinds = list(KIND_WEIGHTS)
    weights = list(KIND_WEIGHTS.values())
    dirs: list[str] = []
    frontier = [prefix]
    for fanout in dirs_per_level:
        nxt = []
        for d in frontier:
            for k in range(rng.randint(max(1, fanout - 3), fanout + 3)):
                nxt.append(f"{d}/{'pkg' if len(d.split('/')) < 3 else 'mod'}{k:03d}")
        dirs.extend(nxt)
        frontier = nxt
    sizes = [_file_size(rng, 8 << 20) for _ in range(files)]
    factor = target_bytes / max(1, sum(sizes))
    sizes = [int(s * factor) for s in sizes]
    members: dict[str, Member] = {}
    for d in [prefix, *dirs]:
        parts = d.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            members.setdefault(p, Member(_info(p, tarfile.DIRTYPE, mode=0o755)))
    file_names: list[str] = []
    for i, size in enumerate(sizes):
        kind = rng.choices(kinds, weights)[0]
        d = rng.choice(dirs)
        name = f"{d}/f{i:06d}{rng.choice(KINDS[kind])}"
        mode = 0o755 if kind == "binary" and rng.random() < 0.3 else 0o644
        members[name] = Member(_info(name, tarfile.REGTYPE, size, mode), kind, rng.randrange(CORPUS_BYTES))
        file_names.append(name)
    for path, kind, mib in large:
        parts = path.split("/")
        for i in range(1, len(parts)):
            p = "/".join(parts[:i])
            members.setdefault(p, Member(_info(p, tarfile.DIRTYPE, mode=0o755)))
        members[path] = Member(_info(path, tarfile.REGTYPE, mib << 20), kind, rng.randrange(CORPUS_BYTES))
    for i in range(files // 50):  # symlinks to files (relative), ~2 %
        d = rng.choice(dirs)
        name = f"{d}/link{i:05d}"
        members.setdefault(name, Member(_info(name, tarfile.SYMTYPE, link="../" + rng.choice(file_names).rsplit("/", 1)[1])))
    for i in range(files // 200):  # hard links to earlier files, ~0.5 %
        target = rng.choice(file_names)
        name = f"{target.rsplit('/', 1)[0]}/hard{i:05d}"
        members.setdefault(name, Member(_info(name, tarfile.LNKTYPE, link=target)))
    # Hard links must follow their targets: sort by name, then move each link after its target.
    ordered = [members[k] for k in sorted(members)]
    links = [m for m in ordered if m.info.type == tarfile.LNKTYPE]
    rest = [m for m in ordered if m.info.type != tarfile.LNKTYPE]
    return rest + links


def top_layer(rng: random.Random, big: list[Member], files: int, target_bytes: int) -> list[Member]:
    """Overwrites, new files, whiteouts of files and directories, and an opaque directory."""
    out = generate_tree(rng, "srv/app", files, target_bytes, [], (4, 4, 3))
    big_files = [m.info.name for m in big if m.info.type == tarfile.REGTYPE]
    big_dirs = sorted({n.rsplit("/", 1)[0] for n in big_files})
    hidden: list[str] = []  # 5 made opaque, 1 whited out; none inside another
    for d in rng.sample(big_dirs, 40):
        if len(hidden) < 6 and not any(d.startswith(h + "/") or h.startswith(d + "/") for h in hidden):
            hidden.append(d)
    kept = [n for n in big_files if not n.startswith(tuple(d + "/" for d in hidden))]
    picked = rng.sample(kept, 500)
    for name in picked[:200]:  # overwritten with new content
        out.append(Member(_info(name, tarfile.REGTYPE, rng.randint(0, 20000)), "text", rng.randrange(CORPUS_BYTES)))
    for name in picked[200:]:
        d, base = name.rsplit("/", 1)
        out.append(Member(_info(f"{d}/.wh.{base}", tarfile.REGTYPE)))
    for d in hidden[:5]:
        out.append(Member(_info(f"{d}/.wh..wh..opq", tarfile.REGTYPE)))
    parent, base = hidden[5].rsplit("/", 1)
    out.append(Member(_info(f"{parent}/.wh.{base}", tarfile.REGTYPE)))
    return out


def members_of(layer: list[Member], data: dict[str, bytes]) -> Iterator[tuple[tarfile.TarInfo, object]]:
    for m in layer:
        if m.info.type == tarfile.REGTYPE and m.kind:
            yield m.info, CorpusReader(data[m.kind], m.offset, m.info.size)
        else:
            yield m.info, None


# ---------------------------------------------------------------------------------------------- image


def build(cache: Path | None = None, scale: float = 1.0) -> dict:
    """The cached image's summary (build_image's format); builds what is missing."""
    cache = cache or build_image.DEFAULT_CACHE / ("big" if scale == 1.0 else f"big-{scale:g}")
    layout = cache / "image"
    blobs = layout / "blobs" / "sha256"
    layers_dir = cache / "layers"
    for d in (blobs, layers_dir):
        d.mkdir(parents=True, exist_ok=True)
    if (summary := build_image.cached_summary(cache)) is not None:
        return summary
    summary_path = cache / "image.json"
    log("generating corpora")
    data = corpora(SEED)
    rng = random.Random(SEED + 1)
    large = [(p, k, max(1, int(mib * scale))) for p, k, mib in LARGE_FILES]
    specs = [("base", generate_tree(rng, "usr", int(5200 * scale), int(110e6 * scale), [], (6, 5, 4)))]
    big = generate_tree(rng, "usr/lib/python3/dist-packages", int(67000 * scale), int(1.62e9 * scale), large)
    specs.append(("big", big))
    specs.append(("top", top_layer(rng, big, int(2500 * scale), int(55e6 * scale))))
    layers = []
    for name, members in specs:
        layers.append(build_image.pack_members(name, members_of(members, data), blobs, layers_dir))
    ids = build_image.write_layout(layout, layers, tag=TAG)
    summary = {"layout": str(layout), "ref": f"oci:{layout}:{TAG}", "tag": TAG, "rootfs_origin": f"generated (seed {SEED})",
               "uncompressed_bytes": sum(x.uncompressed_size for x in layers),
               "compressed_bytes": sum(x.size for x in layers), "members": sum(x.members for x in layers),
               "layers": [x.__dict__ for x in layers], **ids}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    build_image.print_summary(build(args.cache, args.scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
