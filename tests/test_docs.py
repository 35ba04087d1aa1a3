"""README's and docs' commands are commands this checkout takes: every `python -m gruexp.<entry> ...` in their bash
blocks composes with its config (a renamed key, group or option would fail here, not for the reader)."""

from __future__ import annotations

import re
import shlex

import pytest
from helpers import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, entry point, arguments) of every gruexp command in a bash block; placeholders (<run>) left out."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                m = re.match(r"\s*python -m gruexp\.(train|evaluate|generate)\b(.*)", line)
                if m and "<" not in m[2]:
                    args = shlex.split(m[2], comments=True)
                    found.append((f"{doc.name}: {line.strip()[:80]}", m[1], args))
    return found


def _one_job(args: list[str]) -> list[str]:
    """A sweep's first job: `-m` dropped, each sweep override at its first value."""
    out = []
    for o in OverridesParser.create().parse_overrides([a for a in args if a not in ("-m", "--multirun")]):
        if o.is_sweep_override():
            prefix = "+" if o.is_add() else "++" if o.is_force_add() else ""
            sweep = o.value()
            first = sweep.start if isinstance(sweep, IntervalSweep) else next(iter(o.sweep_string_iterator()))
            out.append(f"{prefix}{o.key_or_group}={first}")
        else:
            out.append(o.input_line)
    return out


CASES = commands()


def test_the_docs_hold_commands_to_check():
    entries = {entry for _, entry, _ in CASES}
    assert len(CASES) > 30 and entries == {"train", "evaluate", "generate"}


@pytest.mark.parametrize(("where", "entry", "args"), CASES, ids=[c[0] for c in CASES])
def test_a_documented_command_composes(where, entry, args):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            compose(entry, overrides=_one_job(args), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_the_data_options_table_in_usage_md_gives_the_configs_defaults():
    # the table is written by hand and the defaults live in conf/: a changed default must change it too
    import re

    from helpers import CONF, ROOT
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train")
    GlobalHydra.instance().clear()
    rows = re.findall(r"^\| `data\.(\w+)` \| ([^|]+?) \|", (ROOT / "docs" / "usage.md").read_text(), re.MULTILINE)
    assert {k for k, _ in rows} >= {"batch_size", "num_steps", "max_tokens", "val_fraction", "test_fraction"}
    for key, documented in rows:
        value = cfg.data[key]
        assert documented == ("null" if value is None else str(value)), f"docs/usage.md: data.{key}"


def test_the_module_map_in_design_md_names_every_source_file_and_no_other():
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("## The map") : text.index("\n## ", text.index("## The map") + 1)]
    named = set(re.findall(r"`([\w/]+(?:\.py|\.c|/))`", table))
    src = ROOT / "src" / "gruexp"
    files = {
        p.relative_to(src).as_posix() for p in [*src.glob("*.py"), *src.glob("models/*")] if p.suffix in (".py", ".c")
    }
    files -= {"__init__.py"}
    # a file is named by its path, or by its name alone in a row that begins with its folder
    missing = [f for f in sorted(files) if f not in named and f.rsplit("/", 1)[-1] not in named]
    assert not missing, f"docs/design.md's map lacks {missing}"
    tracked = [p.relative_to(ROOT).as_posix() for d in ("src", "scripts", "tests") for p in (ROOT / d).rglob("*.*")]
    gone = [n for n in named if n.endswith((".py", ".c")) and not any(t.endswith(n) for t in tracked)]
    assert not gone, f"docs/design.md's map names files that do not exist: {gone}"
