"""Sphinx configuration for vmpilot's documentation (built by ``./dev docs``)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))

import vmpilot  # noqa: E402

project = "vmpilot"
copyright = "vmpilot authors"
release = vmpilot.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "vmpilot_api",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]

# Docstrings are written in Markdown-ish prose: `name` means code, not a cross-reference.
default_role = "code"
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Show the aliases by name (explained on the API index page), not their expansions.
autodoc_type_aliases = {
    "Within": "Within",
    "TimeoutArg": "TimeoutArg",
    "Address": "Address",
    "_transport.Address": "Address",
    "PatternArg": "PatternArg",
    "Patterns": "Patterns",
}
autodoc_default_options = {"undoc-members": True}

html_theme = "furo"
html_title = f"vmpilot {release}"
html_static_path: list[str] = []
