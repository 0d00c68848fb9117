"""Sphinx configuration: Markdown pages (MyST) with the Furo theme.

tests/test_docs.py builds the site with `-W --keep-going`, so every warning (a broken link to a
page or a heading, a page in no table of contents, a code block that does not parse) fails.
"""

from __future__ import annotations

project = "listener"
author = "the listener authors"
copyright = "the listener authors, MIT licence"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# `[text](page.md#a-heading)` resolves to headings down to level 4; a missing one is a warning.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist"]

html_theme = "furo"
html_title = "listener"
html_static_path: list[str] = []
# Offline: no external link checking, no fonts or scripts from another host.
html_theme_options = {"navigation_with_keys": True}
pygments_style = "sphinx"
