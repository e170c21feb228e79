"""Which registry pushes convert, and how: the rules file (settings `api_rules_file`, TOML).

    [[rules]]
    name = "team-a"                      # names the rule in answers, logs and request ids
    repository = "team-a/*"              # glob over the pushed repository's name (no host); `*` spans '/'
    overlaybd_tag = "{tag}-obd"          # output tag templates; at least one of the two
    turbo_tag = "{tag}-turbo"
    # optional, with their defaults:
    registry = ""                        # host[:port] the workers use for the source; "" = the event's
    output_repository = ""               # "" = the source repository; e.g. "{registry}/converted/{repository}"
    platforms = []                       # only these platforms of an index
    oci = false
    referrer = false
    algorithm = "lz4"
    block_size = 4096
    vsize_gb = 64
    plain = false                        # http:// to the registry (a distribution event from an
                                         # http:// registry sets it anyway); omit to follow the event
    insecure = false
    credential_ref = ""                  # registry credentials on the workers (and on the API, which
                                         # reads the pushed manifest)
    callback_url = ""                    # http(s) URL told when the conversion ends
    callback_secret_ref = ""

Rules are tried in file order; the first whose `repository` matches decides (none: the push is
ignored). Templates may use `{tag}` (the pushed tag), `{repository}` (the pushed repository's name),
`{name}` (its last path component) and `{registry}` (host[:port] of the source); nothing else.

Loop prevention: obdconv's own pushes come back as events too. A pushed tag that an output tag
template of ANY rule could have produced (`{tag}-obd` -> /^<tag>-obd$/; templates with no text of
their own are skipped) is ignored, and so is a pushed manifest carrying overlaybd layer annotations
(api/events.py looks). A rule whose outputs would land on its own source tag (`overlaybd_tag =
"{tag}"` with no `output_repository`) is refused when the file is loaded.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from api.files import WatchedToml
from api.models import check_callback_url
from obdconv.errors import UsageError

TEMPLATE_FIELDS = {
    "tag": r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    "repository": r"[a-z0-9._/-]+",
    "name": r"[a-z0-9._-]+",
    "registry": r"[^/]+",
}
_STRINGS = ("registry", "output_repository", "credential_ref", "callback_url", "callback_secret_ref", "algorithm")
_INTS = {"block_size": 4096, "vsize_gb": 64}
_BOOLS = ("oci", "referrer", "insecure")
_KEYS = {"name", "repository", "overlaybd_tag", "turbo_tag", "platforms", "plain", *_STRINGS, *_INTS, *_BOOLS}


def _template_parts(template: str, where: str) -> list[tuple[str, str | None]]:
    """(literal text, field or None) pieces of `template`; UsageError for anything but known fields."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"{where}: template {template!r}: {e}") from None
    parts = []
    for literal, field, spec, conversion in parsed:
        if field is not None and (field not in TEMPLATE_FIELDS or spec or conversion):
            raise UsageError(f"{where}: template {template!r}: unknown field {{{field}}}; "
                             f"use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        parts.append((literal, field))
    return parts


def render(template: str, values: dict[str, str]) -> str:
    return "".join(literal + (values[field] if field else "") for literal, field in _template_parts(template, "rule"))


def template_regex(template: str) -> re.Pattern[str] | None:
    """What a rendered template can look like; None for one with no text of its own (it could be
    anything, so it says nothing about where a tag came from)."""
    parts = _template_parts(template, "rule")
    if not any(literal for literal, _ in parts):
        return None
    return re.compile("".join(re.escape(literal) + (f"(?:{TEMPLATE_FIELDS[field]})" if field else "")
                              for literal, field in parts))


@dataclass(frozen=True)
class Rule:
    name: str
    repository: str
    overlaybd_tag: str = ""
    turbo_tag: str = ""
    registry: str = ""
    output_repository: str = ""
    platforms: tuple[str, ...] = ()
    oci: bool = False
    referrer: bool = False
    algorithm: str = "lz4"
    block_size: int = 4096
    vsize_gb: int = 64
    plain: bool | None = None
    insecure: bool = False
    credential_ref: str = ""
    callback_url: str = ""
    callback_secret_ref: str = ""

    def matches(self, repository: str) -> bool:
        return fnmatchcase(repository, self.repository)

    def tag_templates(self) -> list[str]:
        return [t for t in (self.overlaybd_tag, self.turbo_tag) if t]


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()

    def match(self, repository: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(repository)), None)

    def output_template_of(self, tag: str) -> tuple[Rule, str] | None:
        """The (rule, template) that could have produced `tag`, if any (loop prevention)."""
        for rule in self.rules:
            for template in rule.tag_templates():
                pattern = template_regex(template)
                if pattern is not None and pattern.fullmatch(tag):
                    return rule, template
        return None


def _parse_rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise UsageError(f"{where}: `name` must be 1-64 letters, digits, '_', '.' or '-'")
    where = f"{where.rsplit(',', 1)[0]}, rule {name!r}"
    values: dict[str, Any] = {"name": name}
    for key in ("repository", "overlaybd_tag", "turbo_tag", *_STRINGS):
        if key in entry:
            if not isinstance(entry[key], str):
                raise UsageError(f"{where}: `{key}` must be a string")
            values[key] = entry[key]
    for key in _INTS:
        if key in entry:
            if not isinstance(entry[key], int) or isinstance(entry[key], bool):
                raise UsageError(f"{where}: `{key}` must be an integer")
            values[key] = entry[key]
    for key in (*_BOOLS, "plain"):
        if key in entry:
            if not isinstance(entry[key], bool):
                raise UsageError(f"{where}: `{key}` must be true or false")
            values[key] = entry[key]
    platforms = entry.get("platforms", [])
    if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
        raise UsageError(f"{where}: `platforms` must be a list of strings")
    values["platforms"] = tuple(platforms)
    if not values.get("repository"):
        raise UsageError(f"{where}: `repository` (a glob over repository names) is required")
    templates = [t for t in (values.get("overlaybd_tag", ""), values.get("turbo_tag", "")) if t]
    if not templates:
        raise UsageError(f"{where}: give `overlaybd_tag` and/or `turbo_tag` (output tag templates)")
    for template in (*templates, values.get("output_repository", "")):
        _template_parts(template, where)
    if not values.get("output_repository") and any(template_regex(t) is None for t in templates):
        raise UsageError(f"{where}: an output tag template with no text of its own (like \"{{tag}}\") would "
                         "overwrite the pushed tag; add a suffix or set `output_repository`")
    try:
        check_callback_url(values.get("callback_url", ""))
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    return Rule(**values)


def parse_rules(data: dict[str, Any], path: Path, mode: int) -> RuleSet:
    unknown = set(data) - {"rules"}
    if unknown:
        raise UsageError(f"rules file {path}: unknown key(s) {sorted(unknown)}; expected [[rules]] tables")
    entries = data.get("rules", [])
    if not isinstance(entries, list):
        raise UsageError(f"rules file {path}: `rules` must be an array of tables ([[rules]])")
    rules = [_parse_rule(entry, f"rules file {path}, rule #{i + 1}") for i, entry in enumerate(entries)]
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"rules file {path}: rule name(s) used twice: {duplicates}")
    return RuleSet(tuple(rules))


def rules_file(path: str) -> WatchedToml[RuleSet]:
    return WatchedToml(path, parse_rules, RuleSet(), "rules file")
