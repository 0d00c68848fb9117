"""The documentation: the generated reference pages match the code, and the site builds clean."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# docs/ is not an installed package: import its generator from the checkout.
sys.path.insert(0, str(ROOT))
generate = importlib.import_module("docs.generate")


@pytest.mark.parametrize("page", sorted(generate.PAGES), ids=lambda page: page.name)
def test_the_committed_reference_page_matches_the_code(page: Path) -> None:
    expected = generate.PAGES[page]()
    assert page.exists(), f"{page.name} is missing: run `python -m docs.generate`"
    assert page.read_text() == expected, (
        f"docs/reference/{page.name} is stale: run `python -m docs.generate` and commit it"
    )


def test_every_setting_has_a_description() -> None:
    assert generate.missing_descriptions() == [], (
        "describe each new setting in docs/generate.py (DESCRIPTIONS) or with "
        "Field(description=...) in listener/settings.py"
    )


def test_no_description_is_left_for_a_setting_that_is_gone() -> None:
    from listener.settings import Settings

    assert set(generate.DESCRIPTIONS) - set(Settings.model_fields) == set()


def test_a_changed_default_makes_the_settings_page_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """The staleness check can fail: the page is built from the model, not copied."""
    from listener.settings import Settings

    field = Settings.model_fields["worker_concurrency"]
    monkeypatch.setattr(field, "default", field.default + 1)
    assert generate.SETTINGS_PAGE in generate.stale_pages()


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    """Warnings are errors: a link to a missing page or heading, a page in no toctree."""
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(ROOT / "docs"),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stderr + build.stdout
    assert (tmp_path / "html" / "index.html").exists()
    assert (tmp_path / "html" / "reference" / "cli.html").exists()
