"""The rules file (api/rules.py): parsing, matching, templates and the loop-prevention patterns."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from api.rules import parse_rules, render, template_regex
from obdconv.errors import UsageError


def rules(text: str) -> object:
    return parse_rules(tomllib.loads(text), Path("rules.toml"), 0o644)


BASE = '''
[[rules]]
name = "apps"
repository = "apps/*"
overlaybd_tag = "{tag}-obd"
turbo_tag = "{tag}-turbo"

[[rules]]
name = "mirror"
repository = "*"
overlaybd_tag = "{tag}"
output_repository = "{registry}/converted/{repository}"
plain = true
'''


def test_first_matching_rule_wins_and_fields_are_read() -> None:
    ruleset = rules(BASE)
    assert ruleset.match("apps/web").name == "apps"
    assert ruleset.match("apps/team/web").name == "apps"  # `*` spans '/'
    mirror = ruleset.match("library/redis")
    assert mirror.name == "mirror" and mirror.plain is True and mirror.turbo_tag == ""
    assert ruleset.match("apps/web").plain is None  # follow the event's scheme
    assert rules("").match("apps/web") is None


def test_templates_render_and_their_patterns_recognise_outputs() -> None:
    values = {"tag": "1.2", "repository": "apps/web", "name": "web", "registry": "reg.example:5000"}
    assert render("{tag}-obd", values) == "1.2-obd"
    assert render("{registry}/converted/{repository}", values) == "reg.example:5000/converted/apps/web"
    assert render("{name}-{tag}", values) == "web-1.2"
    pattern = template_regex("{tag}-obd")
    assert pattern is not None and pattern.fullmatch("1.2-obd") and not pattern.fullmatch("1.2")
    assert not pattern.fullmatch("-obd")  # a tag cannot be empty
    assert template_regex("{tag}") is None  # no text of its own: says nothing
    ruleset = rules(BASE)
    assert ruleset.output_template_of("v1-turbo")[1] == "{tag}-turbo"
    assert ruleset.output_template_of("v1") is None
    assert ruleset.output_template_of("v1-obd-x") is None


@pytest.mark.parametrize(("text", "says"), [
    ('[[rules]]\nname = "a"\nrepository = "x/*"\n', "give `overlaybd_tag` and/or `turbo_tag`"),
    ('[[rules]]\nname = "a"\noverlaybd_tag = "{tag}-o"\n', "`repository`"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{digest}-o"\n', "unknown field {digest}"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag!r}-o"\n', "unknown field {tag}"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag"\n', "template '{tag'"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag}"\n', "would overwrite the pushed tag"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag}-o"\ncolour = 1\n', "unknown key(s) ['colour']"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag}-o"\ncallback_url = "ftp://h/x"\n',
     "must be http or https"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag}-o"\nblock_size = "4k"\n', "integer"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag}-o"\noci = "yes"\n', "true or false"),
    ('[[rules]]\nname = "a b"\nrepository = "x/*"\noverlaybd_tag = "{tag}-o"\n', "`name`"),
    ('[[rules]]\nname = "a"\nrepository = "x/*"\noverlaybd_tag = "{tag}-o"\n' * 2, "used twice"),
    ('rule = 1\n', "unknown key(s) ['rule']"),
])
def test_bad_rules_files_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(UsageError, match=None) as raised:
        rules(text)
    assert says in str(raised.value)
    assert "rules.toml" in str(raised.value)
