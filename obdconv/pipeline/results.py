"""What the local runner reports: progress events while it runs, the result when it is done, and
the options that choose how it runs (none of which changes the output bytes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from obdconv.registry import RegistryOptions


@dataclass(slots=True)
class ProgressEvent:
    stage: str  # "plan" | "prepare" | "metadata" | "assemble" | "push" | "index" | "done"
    layer_index: int = -1
    layer_digest: str = ""
    done: int = 0
    total: int = 0
    manifest: str = ""
    format: str = ""
    finished: bool = False


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(slots=True)
class OutputResult:
    """One output format's image; or, when the format could not be built (a partial result, see
    feasibility.py), no digests and `error` = {"class": obdconv.errors class name, "message"}."""

    format: str
    repository: str
    tag: str
    root_digest: str = ""
    root_media_type: str = ""
    root_size: int = 0
    manifests: dict[str, str] = field(default_factory=dict)  # source manifest digest -> converted
    indexes: dict[str, str] = field(default_factory=dict)  # source index digest -> converted
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # source chain id -> ConvertedLayer dict
    error: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ConversionResult:
    outputs: list[OutputResult] = field(default_factory=list)
    source_digest: str = ""
    uploaded: bool = True
    # Seconds per stage (summed over tasks) + "total"; "assemble" = "assemble.build" + "assemble.upload".
    timings: dict[str, float] = field(default_factory=dict)

    def output(self, fmt: str) -> OutputResult:
        for o in self.outputs:
            if o.format == fmt:
                return o
        raise KeyError(fmt)

    @property
    def partial(self) -> bool:
        """Some requested format was not built (its output carries `error`)."""
        return any(o.error for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "partial": self.partial}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversionResult:
        return cls(outputs=[OutputResult(**o) for o in d["outputs"]], source_digest=d["source_digest"],
                   uploaded=d["uploaded"], timings=d["timings"])


@dataclass(slots=True)
class RunnerOptions:
    """How the local runner runs (not part of the request: nothing here changes output bytes)."""

    registry: RegistryOptions | None = None  # default: from request.access
    workers: int = 0  # process pool size; 0 = cpu count; 1 = run everything in this process
    spool_dir: str = ""  # default <workdir>/spool
    # dedup DSN (the CLI's --db-str; the request only carries a reference). It may hold a password:
    # kept out of repr so a logged or printed RunnerOptions never shows it.
    db_str: str = field(default="", repr=False)
    keep_spool: bool = False  # keep prepared layers made by this run (also kept with --reserve)
    claim_timeout: float = 3600.0  # seconds to wait for another converter holding a manifest's claim
    # Nice steps the metadata thread is raised by while it applies layers, when the OS allows it
    # (root / CAP_SYS_NICE; otherwise nothing changes). The in-order metadata pass is the critical
    # path once the prepares are done, and it competes for the cores with the assembles it feeds.
    metadata_boost: int = 5


