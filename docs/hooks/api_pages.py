"""mkdocs hook: the API reference, one page per public module, generated from the package tree at build time.

Every module of `PACKAGES` whose dotted name has no part starting with "_" gets a page `api/<dotted name>.md`
holding `::: <dotted name>` (mkdocstrings renders it from the docstrings), and the nav's "API reference" entry
lists them under their top-level package. A new module gets its page without an edit here.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

PACKAGES = ("kvjax", "pallas_kernels", "checkpoints_convert")
ROOT = Path(__file__).resolve().parents[2]
SECTION = "API reference"


def public_modules() -> list[str]:
    """Dotted names of the public modules (packages included), packages before their modules."""
    names = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if not any(part.startswith("_") for part in parts):
                names.append(parts)
    return [".".join(parts) for parts in sorted(names)]


def on_config(config):
    """Fills the nav's `API reference` entry: its index page, then each package's modules."""
    for i, entry in enumerate(config["nav"]):
        if isinstance(entry, dict) and SECTION in entry:
            pages = [entry[SECTION]] if isinstance(entry[SECTION], str) else list(entry[SECTION])
            for package in PACKAGES:
                modules = [name for name in public_modules() if name.split(".")[0] == package]
                pages.append({package: [{name: f"api/{name}.md"} for name in modules]})
            config["nav"][i] = {SECTION: pages}
    return config


def on_files(files, config):
    """Adds the generated pages."""
    for name in public_modules():
        files.append(File.generated(config, f"api/{name}.md", content=f"::: {name}\n"))
    return files
