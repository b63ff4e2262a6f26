"""mkdocs hook: docstrings are written in reStructuredText habits (``:func:`name``` roles, ``::``
before a literal block); rendered by mkdocstrings as Markdown they would show the role's name
and the double colon. Keep the code, drop the role; end the paragraph with one colon."""

import re

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(<code>)")
_LITERAL = re.compile(r"::</p>")


def on_page_content(html: str, **kwargs) -> str:
    return _LITERAL.sub(":</p>", _ROLE.sub(r"\1", html))
