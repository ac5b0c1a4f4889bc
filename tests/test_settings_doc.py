"""docs/settings.md is what spanner/settings.py says, and every setting says what it means."""

from __future__ import annotations

import subprocess
import sys
from enum import StrEnum
from pathlib import Path

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from spanner import settings_doc
from spanner.settings import Settings


def test_docs_settings_md_matches_the_settings_object() -> None:
    assert settings_doc.DOC_PATH.read_text() == settings_doc.render(), (
        "docs/settings.md is out of date: run python -m spanner.settings_doc"
    )


def test_every_setting_is_documented_and_explained() -> None:
    text = settings_doc.render()
    for name, field in Settings.model_fields.items():
        for env in settings_doc.env_names(name, field):
            assert f"`{env}`" in text
        assert settings_doc.meaning(name, field), f"{name} has neither a description nor a note"


def test_notes_only_stand_in_for_missing_descriptions() -> None:
    fields = Settings.model_fields
    stale = [name for name in settings_doc.NOTES if name not in fields or fields[name].description]
    assert not stale, f"remove these from spanner/settings_doc.py NOTES: {stale}"


def test_the_check_fails_when_the_page_drifts(tmp_path: Path) -> None:
    page = tmp_path / "settings.md"
    check = [sys.executable, "-m", "spanner.settings_doc", "--check", "--path", str(page)]
    written = subprocess.run([sys.executable, "-m", "spanner.settings_doc", "--path", str(page)], check=True)
    assert written.returncode == 0 and subprocess.run(check, capture_output=True).returncode == 0
    page.write_text(page.read_text().replace("`SPANNER_HTTP_PORT`", "`SPANNER_HTTP_PORTS`"))
    drifted = subprocess.run(check, capture_output=True)
    assert drifted.returncode == 1 and b"out of date" in drifted.stderr


def test_enums_and_secrets_are_written_out_without_their_secret() -> None:
    class Mode(StrEnum):
        FAST = "fast"
        SAFE = "safe"

    assert settings_doc.type_text(Mode) == "`fast` \\| `safe`"
    assert settings_doc.default_text("mode", FieldInfo(default=Mode.SAFE)) == "`safe`"
    assert settings_doc.type_text(SecretStr) == "text (secret)"
    assert settings_doc.default_text("key", FieldInfo(default=SecretStr("hunter2"))) == "(set)"
    assert settings_doc.default_text("key", FieldInfo(default=SecretStr(""))) == "(none)"
