"""The three-way settings table: paper text, official code, profiles -- complete and in the README."""
import dataclasses
from pathlib import Path

from decoflow_core.config import Config, make_config
from decoflow_core.settings import (
    PROFILE_COLUMNS,
    SETTINGS,
    settings_markdown,
    settings_table,
)

KIT = Path(__file__).resolve().parents[1]


def test_every_field_where_the_profiles_differ_is_in_the_table():
    configs = [make_config(name) for name in PROFILE_COLUMNS]
    listed = [field for _, fields, *_ in SETTINGS for field in fields]
    assert len(listed) == len(set(listed)), "a field is listed twice"
    known = {f.name for f in dataclasses.fields(Config)}
    assert set(listed) <= known
    differing = {name for name in known if len({repr(getattr(c, name)) for c in configs}) > 1}
    machinery = {"feature_cache", "device", "num_threads"}
    assert differing - machinery <= set(listed), f"undocumented differences: {differing - set(listed)}"


def test_profile_columns_read_the_profiles_and_a_run_config():
    table = settings_table(run_config={**dataclasses.asdict(make_config("cpu")), "rank": 8}).set_index("setting")
    assert table.loc["LoRA rank", "`paper`"] == "64" and table.loc["LoRA rank", "`cpu`"] == "16"
    assert table.loc["LoRA rank", "this run"] == "8"
    assert table.loc["DCS coupling", "`official`"] == "freia"
    assert table.loc["Gradient clipping", "`official`"] == "0.5" and table.loc["Gradient clipping", "`paper`"] == "none"


def test_the_readme_and_the_docs_carry_the_table():
    assert settings_markdown(cite=False, fields=False) in (KIT / "README.md").read_text(), \
        "README's settings table is stale: paste settings_markdown(cite=False, fields=False)"
    assert settings_markdown(cite=True) in (KIT / "docs" / "official.md").read_text(), \
        "docs/official.md's settings table is stale: paste settings_markdown(cite=True)"
