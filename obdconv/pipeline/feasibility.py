"""Which of the requested output formats an image can become, decided at plan time.

A format is impossible for an image when the image itself rules it out, whatever the run does:
* turboOCI needs every source layer gzip-compressed or uncompressed (the runtime reads file data
  from the original blob through `gzip.meta` or directly): a zstd layer, by media type or by its
  first bytes (media types lie: the sniff reads 512 bytes with a range request), rules it out;
* turboOCI over a base layer (`--mkfs=false`) needs the base layer the reference hard-codes
  (baselayer.turbo_base_problem).

Deciding here, before anything is downloaded in full, means the possible formats are converted
with one prepare and one metadata pass, and nothing of the impossible one is made or pushed. A
format is decided for the whole image (an index is delivered whole or not at all). When the first
bytes cannot be read here, prepare still refuses a zstd layer for turboOCI (the whole request then
fails, as before).

What happens to a refused format (`deliverable`):
* the others are delivered and the result names the refused one and why (a partial result: the
  CLI exits with `PartialResultError.exit_code`, the fleet's final state is PARTIAL);
* with `all_or_nothing`, or when no format is left, the request fails up front with
  UnsupportedError, having converted and pushed nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from obdconv.errors import ObdconvError, UnsupportedError
from obdconv.oci.decompress import sniff
from obdconv.pipeline.baselayer import BaseLayer, turbo_base_problem
from obdconv.pipeline.plan import ImagePlan
from obdconv.pipeline.prepare import SNIFF_BYTES, turbo_zstd_error
from obdconv.request import ConversionProfile

log = logging.getLogger(__name__)

SNIFF_THREADS = 8


@dataclass(frozen=True, slots=True)
class Refusal:
    """An output format the image cannot become, and why (an obdconv.errors class name)."""

    format: str
    error_class: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"class": self.error_class, "message": self.message}


def _zstd_by_media_type(layer: dict[str, Any]) -> bool:
    media_type = str(layer.get("mediaType", ""))
    return media_type.endswith("+zstd") or media_type.endswith(".zstd")


def _sniffed(source_repo: Any, layers: list[dict[str, Any]]) -> dict[str, str]:
    """Digest -> sniffed compression of each layer whose first bytes could be read."""

    def head(layer: dict[str, Any]) -> tuple[str, str]:
        digest = layer["digest"]
        try:
            return digest, sniff(source_repo.read_blob_range(digest, 0, SNIFF_BYTES))
        except ObdconvError as e:  # decided by prepare instead
            log.info("could not sniff layer %s at plan time (%s)", digest, e)
            return digest, ""

    if len(layers) <= 1:
        return dict(map(head, layers))
    with ThreadPoolExecutor(min(SNIFF_THREADS, len(layers)), thread_name_prefix="sniff") as pool:
        return dict(pool.map(head, layers))


def turbo_refusal(plan: ImagePlan, source_repo: Any, base: BaseLayer | None = None) -> Refusal | None:
    """Why this image cannot become turboOCI, or None."""
    if base is not None and (problem := turbo_base_problem(base)):
        return Refusal("turbo", UnsupportedError.__name__, problem)
    layers = plan.unique_layers()
    for layer in layers:
        if _zstd_by_media_type(layer):
            return Refusal("turbo", UnsupportedError.__name__, str(turbo_zstd_error(layer["digest"])))
    kinds = _sniffed(source_repo, layers)
    for layer in layers:
        if kinds.get(layer["digest"]) == "zstd":
            return Refusal("turbo", UnsupportedError.__name__, str(turbo_zstd_error(layer["digest"])))
    return None


def refusals(plan: ImagePlan, profiles: Iterable[ConversionProfile], source_repo: Any,
             base: BaseLayer | None = None) -> dict[str, Refusal]:
    """format -> Refusal for each requested format the image cannot become."""
    out: dict[str, Refusal] = {}
    for profile in profiles:
        if profile.format == "turbo" and (refusal := turbo_refusal(plan, source_repo, base)) is not None:
            out["turbo"] = refusal
    return out


def deliverable(profiles: list[ConversionProfile], refused: dict[str, Refusal], *,
                all_or_nothing: bool) -> list[ConversionProfile]:
    """The profiles to convert. Raises UnsupportedError when `all_or_nothing` and a format is
    refused, or when every requested format is."""
    if not refused:
        return profiles
    why = "; ".join(f"{_name(fmt)}: {r.message}" for fmt, r in refused.items())
    if all_or_nothing:
        raise UnsupportedError(f"--all-or-nothing: nothing converted, as {why}")
    left = [p for p in profiles if p.format not in refused]
    if not left:
        raise UnsupportedError(why)
    for fmt, refusal in refused.items():
        log.warning("%s output not built: %s", _name(fmt), refusal.message)
    return left


def _name(fmt: str) -> str:
    return {"native": "overlaybd", "turbo": "turboOCI"}.get(fmt, fmt)
