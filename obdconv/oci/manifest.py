"""Manifest, index and config JSON: parsing (keeping every field and key order), Go-compatible
encoding, platform matching, attestation detection and descriptor helpers.

Two ways to produce JSON:

* keep the source object: `parse_json` (json.loads keeps key order and unknown fields) and
  `go_json` (Go `encoding/json` byte rules, spec reference-convertor §4.6) — for objects we only
  change in place;
* re-encode like the reference convertor, which decodes into Go structs and marshals them (so
  unknown fields are dropped, keys come out in struct order, empty optional fields are omitted,
  timestamps are re-formatted): `go_image_config`, `go_descriptor`, `go_manifest`, `go_index`
  (spec §4.3-§4.5). Their output goes through `go_json` for digest parity with the reference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from obdconv.errors import BadInputError
from obdconv.oci import mediatypes as mt
from obdconv.oci.digests import parse_digest

# ---------------------------------------------------------------------------------------------
# parsing and kinds
# ---------------------------------------------------------------------------------------------


def parse_json(data: bytes | str, what: str = "JSON document") -> dict[str, Any]:
    """Parse a manifest/index/config; must be a JSON object. Key order and unknown fields kept."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:  # the C decoder recurses per nesting level
        raise BadInputError(f"{what} is nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{what} is not a JSON object")
    return obj


def kind_of(media_type: str) -> str:
    """"manifest", "index" or "other"."""
    if media_type in mt.MANIFEST_TYPES:
        return "manifest"
    if media_type in mt.INDEX_TYPES:
        return "index"
    return "other"


def detect_media_type(obj: Mapping[str, Any], fallback: str = "") -> str:
    """The media type of a parsed manifest/index: its `mediaType` field, else guessed from shape."""
    media_type = obj.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if fallback:
        return fallback
    if "manifests" in obj:
        return mt.OCI_INDEX
    if "config" in obj and "layers" in obj:
        return mt.OCI_MANIFEST
    return ""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise BadInputError(message)


def validate_descriptor(desc: Any, where: str) -> None:
    """Required descriptor fields: string mediaType, valid digest, non-negative integer size."""
    _require(isinstance(desc, dict), f"{where}: descriptor is not an object")
    _require(isinstance(desc.get("mediaType"), str) and desc["mediaType"] != "",
             f"{where}: descriptor has no mediaType")
    _require(isinstance(desc.get("digest"), str), f"{where}: descriptor has no digest")
    try:
        parse_digest(desc["digest"])
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None
    size = desc.get("size")
    _require(isinstance(size, int) and not isinstance(size, bool) and size >= 0,
             f"{where}: descriptor size {size!r} is not a non-negative integer")


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """A single-image manifest must have schemaVersion 2, a config descriptor and a layer list."""
    _require(manifest.get("schemaVersion") == 2,
             f"manifest schemaVersion is {manifest.get('schemaVersion')!r}, expected 2")
    media_type = manifest.get("mediaType")
    if media_type is not None:
        _require(media_type in mt.MANIFEST_TYPES, f"manifest mediaType {media_type!r} is not an image manifest")
    validate_descriptor(manifest.get("config"), "manifest config")
    layers = manifest.get("layers")
    _require(isinstance(layers, list), "manifest has no layers list")
    for i, layer in enumerate(layers):
        validate_descriptor(layer, f"manifest layer {i}")


def validate_index(index: Mapping[str, Any]) -> None:
    _require(index.get("schemaVersion") == 2,
             f"index schemaVersion is {index.get('schemaVersion')!r}, expected 2")
    media_type = index.get("mediaType")
    if media_type is not None:
        _require(media_type in mt.INDEX_TYPES, f"index mediaType {media_type!r} is not an image index")
    manifests = index.get("manifests")
    _require(isinstance(manifests, list), "index has no manifests list")
    for i, entry in enumerate(manifests):
        validate_descriptor(entry, f"index entry {i}")


def config_diff_ids(config: Mapping[str, Any], layer_count: int) -> list[str]:
    """`rootfs.diff_ids`, checked against the manifest's layer count (the reference panics, spec §10.3)."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    _require(isinstance(diff_ids, list), "config has no rootfs.diff_ids list")
    _require(len(diff_ids) >= layer_count,
             f"config lists {len(diff_ids)} diff_ids but the manifest has {layer_count} layers")
    for d in diff_ids:
        _require(isinstance(d, str), f"config diff_id {d!r} is not a string")
        parse_digest(d)
    return list(diff_ids[:layer_count])


def is_attestation(desc: Mapping[str, Any]) -> bool:
    """BuildKit attestation manifests in an index (dropped on conversion, spec §2.1)."""
    annotations = desc.get("annotations") or {}
    return annotations.get(mt.ANNOTATION_DOCKER_REFERENCE_TYPE) == mt.ATTESTATION_MANIFEST


# ---------------------------------------------------------------------------------------------
# platforms
# ---------------------------------------------------------------------------------------------

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def normalize_platform(p: Platform) -> Platform:
    """containerd-style normalisation: arch aliases; arm64 v8 and amd64 v1 are the defaults."""
    arch = _ARCH_ALIASES.get(p.architecture.lower(), p.architecture.lower())
    variant = p.variant.lower()
    if (arch == "arm64" and variant == "v8") or (arch == "amd64" and variant == "v1"):
        variant = ""
    if p.architecture.lower() == "armhf" and not variant:
        variant = "v7"
    elif p.architecture.lower() == "armel" and not variant:
        variant = "v6"
    return Platform(p.os.lower(), arch, variant)


def parse_platform(spec: str) -> Platform:
    """`os/arch[/variant]` -> Platform; BadInputError when malformed."""
    parts = spec.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise BadInputError(f"bad platform {spec!r}: expected os/arch[/variant]")
    return normalize_platform(Platform(*parts))


def parse_platforms(specs: str | Iterable[str]) -> list[Platform]:
    """A filter list: comma-separated string or iterable of `os/arch[/variant]`."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    return [parse_platform(s) for s in specs]


def platform_of(desc: Mapping[str, Any]) -> Platform | None:
    """The platform of an index entry (None when absent)."""
    p = desc.get("platform")
    if not isinstance(p, dict):
        return None
    return normalize_platform(Platform(str(p.get("os", "")), str(p.get("architecture", "")),
                                       str(p.get("variant", "") or "")))


def platform_matches(desc: Mapping[str, Any], wanted: list[Platform]) -> bool:
    """Does an index entry match the filter? An empty filter matches everything.

    A filter without variant matches any variant of that os/arch; with a variant it must be equal
    (after normalisation). Entries without a platform match only an empty filter.
    """
    if not wanted:
        return True
    have = platform_of(desc)
    if have is None:
        return False
    for w in wanted:
        if w.os == have.os and w.architecture == have.architecture and (
            not w.variant or w.variant == have.variant
        ):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Go encoding/json
# ---------------------------------------------------------------------------------------------

_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_HTML_RE = re.compile("[<>&\u2028\u2029]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _go_string(s: str) -> str:
    # json.dumps escapes exactly what Go does for control chars (\b \f \n \r \t short, others
    # \u00xx lowercase, as Go >= 1.22); Go additionally escapes <>& and U+2028/9 (HTML safety),
    # and replaces invalid UTF-8 (here: lone surrogates) with U+FFFD.
    if _SURROGATE_RE.search(s):
        s = _SURROGATE_RE.sub("\ufffd", s)
    out = json.dumps(s, ensure_ascii=False)
    return _HTML_RE.sub(lambda m: _HTML_ESCAPES[m.group()], out)


def _go_float(f: float) -> str:
    # Go (encoding/json floatEncoder): shortest round-trip digits ('f', -1) for 1e-6 <= |f| < 1e21,
    # else ('e', -1) with "e-07" cleaned to "e-7". Python's repr gives the same shortest digits.
    if f != f or f in (float("inf"), float("-inf")):
        raise BadInputError(f"cannot encode {f!r} as JSON")
    a = abs(f)
    if a == 0 or 1e-6 <= a < 1e21:
        return format(Decimal(repr(f)).normalize(), "f")
    text = repr(f)
    return re.sub(r"e-0(\d)$", r"e-\1", text)


def _encode_scalar(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(_go_string(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(_go_float(obj))
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _encode(obj: Any, out: list[str]) -> None:
    """Iterative (a config keeps every field of the source's, nested as deep as its author liked):
    a stack of open containers, each with an iterator over its (key, value) or values."""
    stack: list[tuple[Any, str]] = []  # (iterator over the container's items, its closing bracket)
    value: Any = obj
    while True:
        if isinstance(value, Mapping):
            out.append("{")
            stack.append((iter(value.items()), "}"))
        elif isinstance(value, (list, tuple)):
            out.append("[")
            stack.append((iter(value), "]"))
        else:
            _encode_scalar(value, out)
        while stack:
            items, close = stack[-1]
            item = next(items, _END)
            if item is _END:
                stack.pop()
                out.append(close)
                continue
            if out[-1] not in ("{", "["):
                out.append(",")
            if close == "}":
                key, value = item
                out.append(_go_string(str(key)))
                out.append(":")
            else:
                value = item
            break
        else:
            return


_END = object()


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's `json.Marshal` writes it (keys in the given order; no trailing newline)."""
    out: list[str] = []
    _encode(obj, out)
    return "".join(out).encode("utf-8")


def go_sorted_map(m: Mapping[str, Any]) -> dict[str, Any]:
    """A Go map's key order: sorted by UTF-8 bytes."""
    return {k: m[k] for k in sorted(m, key=lambda k: k.encode("utf-8", "surrogatepass"))}


# -- RFC 3339 times (Go time.Time JSON) ---------------------------------------------------------

_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)


def go_time(value: str) -> str:
    """Re-emit an RFC 3339 time as Go's RFC3339Nano: fraction without trailing zeros, offset kept, UTC as Z."""
    m = _RFC3339_RE.match(value)
    if not m:
        raise BadInputError(f"bad RFC 3339 time {value!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise BadInputError(f"bad RFC 3339 time {value!r}: {exc}") from exc
    frac = (m.group(7) or "")[:9].rstrip("0")
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if frac:
        text += "." + frac
    if m.group(8) or (m.group(10) == "00" and m.group(11) == "00"):
        # Go parses "+00:00" into UTC and prints "Z"
        return text + "Z"
    offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
    _require(offset < timedelta(hours=24), f"bad RFC 3339 offset in {value!r}")
    return f"{text}{m.group(9)}{m.group(10)}:{m.group(11)}"


# ---------------------------------------------------------------------------------------------
# Go struct re-encoding (the reference decodes into image-spec structs and marshals them)
# ---------------------------------------------------------------------------------------------


def _go_decode_fields(obj: Any, fields: tuple[str, ...], where: str) -> dict[str, Any]:
    """Go's decoder: exact key match preferred, else case-insensitive; unknown keys dropped; last wins."""
    if obj is None:
        return {}
    _require(isinstance(obj, dict), f"{where}: expected a JSON object")
    folded = {f.lower(): f for f in fields}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = key if key in fields else folded.get(key.lower())
        if name is not None:
            out[name] = value
    return out


def _string(v: Any, where: str) -> str:
    if v is None:
        return ""
    _require(isinstance(v, str), f"{where}: expected a string, got {v!r}")
    return v


def _strings(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    _require(isinstance(v, list) and all(isinstance(s, str) for s in v), f"{where}: expected a list of strings")
    return list(v)


def _bool(v: Any, where: str) -> bool:
    if v is None:
        return False
    _require(isinstance(v, bool), f"{where}: expected a boolean, got {v!r}")
    return v


def _int(v: Any, where: str) -> int:
    if v is None:
        return 0
    _require(isinstance(v, int) and not isinstance(v, bool), f"{where}: expected an integer, got {v!r}")
    return v


def _string_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    _require(isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
             f"{where}: expected an object of strings")
    return go_sorted_map(v)


def _set_map(v: Any, where: str) -> dict[str, dict]:
    # map[string]struct{}: whatever the values were, they re-encode as {}
    if v is None:
        return {}
    _require(isinstance(v, dict), f"{where}: expected an object")
    return {k: {} for k in go_sorted_map(v)}


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """`omitempty`: skip "", 0, false, empty list/map, None."""
    if value is None or value == "" or value is False or value == [] or value == {}:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return
    out[key] = value


_CONFIG_FIELDS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
                  "StopSignal", "ArgsEscaped")
_IMAGE_FIELDS = ("created", "author", "architecture", "os", "os.version", "os.features", "variant", "config",
                 "rootfs", "history")
_HISTORY_FIELDS = ("created", "created_by", "author", "comment", "empty_layer")
_ROOTFS_FIELDS = ("type", "diff_ids")


def go_image_config(config: Mapping[str, Any], diff_ids: list[str] | None = None) -> dict[str, Any]:
    """The source config as the reference re-encodes it (OCI `Image` struct, spec §4.3),
    with `rootfs.diff_ids` replaced by `diff_ids` when given."""
    src = _go_decode_fields(config, _IMAGE_FIELDS, "config")
    out: dict[str, Any] = {}
    if src.get("created") is not None:
        out["created"] = go_time(_string(src["created"], "config created"))
    _put(out, "author", _string(src.get("author"), "config author"))
    out["architecture"] = _string(src.get("architecture"), "config architecture")
    out["os"] = _string(src.get("os"), "config os")
    _put(out, "os.version", _string(src.get("os.version"), "config os.version"))
    _put(out, "os.features", _strings(src.get("os.features"), "config os.features"))
    _put(out, "variant", _string(src.get("variant"), "config variant"))

    cfg = _go_decode_fields(src.get("config"), _CONFIG_FIELDS, "config.config")
    run: dict[str, Any] = {}
    _put(run, "User", _string(cfg.get("User"), "config User"))
    _put(run, "ExposedPorts", _set_map(cfg.get("ExposedPorts"), "config ExposedPorts"))
    _put(run, "Env", _strings(cfg.get("Env"), "config Env"))
    _put(run, "Entrypoint", _strings(cfg.get("Entrypoint"), "config Entrypoint"))
    _put(run, "Cmd", _strings(cfg.get("Cmd"), "config Cmd"))
    _put(run, "Volumes", _set_map(cfg.get("Volumes"), "config Volumes"))
    _put(run, "WorkingDir", _string(cfg.get("WorkingDir"), "config WorkingDir"))
    _put(run, "Labels", _string_map(cfg.get("Labels"), "config Labels"))
    _put(run, "StopSignal", _string(cfg.get("StopSignal"), "config StopSignal"))
    _put(run, "ArgsEscaped", _bool(cfg.get("ArgsEscaped"), "config ArgsEscaped"))
    out["config"] = run

    rootfs = _go_decode_fields(src.get("rootfs"), _ROOTFS_FIELDS, "config rootfs")
    ids = diff_ids if diff_ids is not None else rootfs.get("diff_ids")
    out["rootfs"] = {"type": _string(rootfs.get("type"), "rootfs type"),
                     "diff_ids": None if ids is None else _strings(ids, "rootfs diff_ids")}

    history = src.get("history")
    if history is not None:
        _require(isinstance(history, list), "config history is not a list")
        items = []
        for i, h in enumerate(history):
            hf = _go_decode_fields(h, _HISTORY_FIELDS, f"config history {i}")
            item: dict[str, Any] = {}
            if hf.get("created") is not None:
                item["created"] = go_time(_string(hf["created"], "history created"))
            _put(item, "created_by", _string(hf.get("created_by"), "history created_by"))
            _put(item, "author", _string(hf.get("author"), "history author"))
            _put(item, "comment", _string(hf.get("comment"), "history comment"))
            _put(item, "empty_layer", _bool(hf.get("empty_layer"), "history empty_layer"))
            items.append(item)
        _put(out, "history", items)
    return out


_PLATFORM_FIELDS = ("architecture", "os", "os.version", "os.features", "variant")
_DESCRIPTOR_FIELDS = ("mediaType", "digest", "size", "urls", "annotations", "data", "platform", "artifactType")


def go_platform(p: Mapping[str, Any]) -> dict[str, Any]:
    src = _go_decode_fields(p, _PLATFORM_FIELDS, "platform")
    out: dict[str, Any] = {"architecture": _string(src.get("architecture"), "platform architecture"),
                           "os": _string(src.get("os"), "platform os")}
    _put(out, "os.version", _string(src.get("os.version"), "platform os.version"))
    _put(out, "os.features", _strings(src.get("os.features"), "platform os.features"))
    _put(out, "variant", _string(src.get("variant"), "platform variant"))
    return out


def go_descriptor(desc: Mapping[str, Any]) -> dict[str, Any]:
    """An OCI `Descriptor` as Go marshals it: struct key order, omitempty, annotations sorted."""
    src = _go_decode_fields(desc, _DESCRIPTOR_FIELDS, "descriptor")
    out: dict[str, Any] = {"mediaType": _string(src.get("mediaType"), "descriptor mediaType"),
                           "digest": _string(src.get("digest"), "descriptor digest"),
                           "size": _int(src.get("size"), "descriptor size")}
    _put(out, "urls", _strings(src.get("urls"), "descriptor urls"))
    _put(out, "annotations", _string_map(src.get("annotations"), "descriptor annotations"))
    _put(out, "data", _string(src.get("data"), "descriptor data"))
    if src.get("platform") is not None:
        out["platform"] = go_platform(src["platform"])
    _put(out, "artifactType", _string(src.get("artifactType"), "descriptor artifactType"))
    return out


def descriptor(media_type: str, digest: str, size: int, annotations: Mapping[str, str] | None = None,
               **extra: Any) -> dict[str, Any]:
    """A new descriptor in Go key order (annotations sorted as a Go map)."""
    fields: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        fields["annotations"] = dict(annotations)
    fields.update(extra)
    return go_descriptor(fields)


_MANIFEST_FIELDS = ("schemaVersion", "mediaType", "artifactType", "config", "layers", "subject", "annotations")
_INDEX_FIELDS = ("schemaVersion", "mediaType", "artifactType", "manifests", "subject", "annotations")


def go_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """An OCI `Manifest` struct re-encoded (spec §4.4 key order; unknown fields dropped)."""
    src = _go_decode_fields(manifest, _MANIFEST_FIELDS, "manifest")
    out: dict[str, Any] = {"schemaVersion": _int(src.get("schemaVersion"), "manifest schemaVersion")}
    _put(out, "mediaType", _string(src.get("mediaType"), "manifest mediaType"))
    _put(out, "artifactType", _string(src.get("artifactType"), "manifest artifactType"))
    out["config"] = go_descriptor(src.get("config") or {})
    layers = src.get("layers")
    out["layers"] = None if layers is None else [go_descriptor(d) for d in layers]
    if src.get("subject") is not None:
        out["subject"] = go_descriptor(src["subject"])
    _put(out, "annotations", _string_map(src.get("annotations"), "manifest annotations"))
    return out


def go_index(index: Mapping[str, Any]) -> dict[str, Any]:
    """An OCI `Index` struct re-encoded (unknown fields dropped)."""
    src = _go_decode_fields(index, _INDEX_FIELDS, "index")
    out: dict[str, Any] = {"schemaVersion": _int(src.get("schemaVersion"), "index schemaVersion")}
    _put(out, "mediaType", _string(src.get("mediaType"), "index mediaType"))
    _put(out, "artifactType", _string(src.get("artifactType"), "index artifactType"))
    manifests = src.get("manifests")
    out["manifests"] = None if manifests is None else [go_descriptor(d) for d in manifests]
    if src.get("subject") is not None:
        out["subject"] = go_descriptor(src["subject"])
    _put(out, "annotations", _string_map(src.get("annotations"), "index annotations"))
    return out
