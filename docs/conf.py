"""Sphinx configuration of jlstm's docs site (the guides in docs/*.md, which include BENCHMARKS.md
and experiments/README.md, and the API reference): `make docs` builds it into docs/_build/html with
warnings as errors (sphinx-build -W --keep-going). The docstrings are Google style (napoleon) with
reST inside (``literals``, :func: cross-references), which is what Sphinx reads natively. Nothing
is fetched: no intersphinx inventories, and the theme (furo) ships its assets and uses system fonts.
"""

import jlstm

project = "jlstm"
release = version = jlstm.__version__
copyright = "jlstm authors, Apache-2.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

# Every `.. automodule::` documents its public, documented members in source order (modules with
# an __all__ document exactly those), so adding a module to the reference is one line in api.rst.
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
# Not nitpicky: the implementation modules' docstrings name their own internals (documented only
# as module text), and other libraries' types would need inventories fetched from the web.
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"jlstm {release}"
