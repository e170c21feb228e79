"""What `obdconv verify` found: findings, the fsck result, documented differences, per platform and
for the image; text and JSON forms; `raise_for_report`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from obdconv.errors import BadInputError
from obdconv.faithful import DifferenceGroup

ERROR, WARNING, INFO = "error", "warning", "info"


class VerificationFailed(BadInputError):
    """The converted image does not match its source or breaks a format rule (see the report)."""
    def __init__(self, message: str, report: VerifyReport) -> None:
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------- report


@dataclass(slots=True)
class Finding:
    """One observation. `where` names the object ("manifest", "config", "layer 2", "filesystem")."""
    severity: str  # ERROR, WARNING or INFO
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


@dataclass(slots=True)
class FsckResult:
    """`e2fsck -fn` on the flattened image. status: "clean", "known-quirk", "errors" or "not-run"."""
    status: str
    exit_code: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("clean", "known-quirk")


@dataclass(slots=True)
class PlatformReport:
    platform: str
    manifest_digest: str
    source_manifest_digest: str
    format: str = ""  # "overlaybd" or "turbo"
    layers: int = 0
    findings: list[Finding] = field(default_factory=list)
    fsck: FsckResult = field(default_factory=lambda: FsckResult("not-run"))
    tree_diff: list[str] = field(default_factory=list)
    # Documented differences found (obdconv.faithful): expected, reported, never a failure.
    differences: list[DifferenceGroup] = field(default_factory=list)
    entries_compared: int = 0
    filesystem_compared: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.tree_diff and self.filesystem_compared and self.fsck.ok

    def add(self, severity: str, where: str, message: str) -> None:
        self.findings.append(Finding(severity, where, message))


@dataclass(slots=True)
class VerifyReport:
    ref: str
    source_ref: str
    method: str  # "userspace" or "mount"
    platforms: list[PlatformReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # image-level (index, platform matching)

    @property
    def ok(self) -> bool:
        return (bool(self.platforms) and all(p.ok for p in self.platforms)
                and not any(f.severity == ERROR for f in self.findings))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        for pd, p in zip(d["platforms"], self.platforms, strict=True):
            pd["ok"] = p.ok
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def format_text(self, max_diff_lines: int = 200) -> str:
        lines = [f"verify {self.ref} against {self.source_ref} ({self.method}): {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  {f}" for f in self.findings]
        for p in self.platforms:
            lines.append(f"platform {p.platform}: {p.format or '?'} image {p.manifest_digest}, {p.layers} layer(s), "
                         f"source {p.source_manifest_digest}: {'OK' if p.ok else 'FAILED'}")
            lines += [f"  {f}" for f in p.findings]
            if p.fsck.status == "known-quirk":
                lines.append("  fsck: only the reference mkfs's known lost+found HTREE quirk "
                             "(not a failure): " + "; ".join(p.fsck.problems))
            elif p.fsck.status == "errors":
                lines.append(f"  fsck: e2fsck -fn exit {p.fsck.exit_code}:")
                lines += [f"    {line}" for line in p.fsck.problems]
            else:
                lines.append(f"  fsck: {p.fsck.status}")
            if p.filesystem_compared:
                lines.append(f"  filesystem: {p.entries_compared} paths compared, {len(p.tree_diff)} difference(s)")
                lines += [f"    {d}" for d in p.tree_diff[:max_diff_lines]]
                if len(p.tree_diff) > max_diff_lines:
                    lines.append(f"    ... {len(p.tree_diff) - max_diff_lines} more")
                if p.differences:
                    lines.append("  documented differences (conversion rules, not failures):")
                    for g in p.differences:
                        lines.append(f"    {g.what}: {g.count} ({g.reason})")
                        lines += [f"      {example}" for example in g.examples]
                        if g.count > len(g.examples):
                            lines.append(f"      ... {g.count - len(g.examples)} more")
            else:
                lines.append("  filesystem: not compared (see errors above)")
        return "\n".join(lines)


def raise_for_report(report: VerifyReport) -> None:
    """Raise VerificationFailed (exit code 65) naming the first problems when the report is not ok."""
    if report.ok:
        return
    problems: list[str] = [str(f) for f in report.findings if f.severity == ERROR]
    for p in report.platforms:
        problems += [f"{p.platform}: {f}" for f in p.errors]
        if p.fsck.status == "errors":
            problems.append(f"{p.platform}: e2fsck: {'; '.join(p.fsck.problems[:3])}")
        problems += [f"{p.platform}: {d}" for d in p.tree_diff[:5]]
    if not report.platforms:
        problems.append("no platform was verified")
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    raise VerificationFailed("converted image does not verify: " + "; ".join(problems[:5]) + more, report)
