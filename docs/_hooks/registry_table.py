"""mkdocs hook: replace the marker ``<!-- registry-table -->`` with the method table generated
from tokenkern.methods.registry, so the docs list exactly the registered methods."""

MARKER = "<!-- registry-table -->"


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    from tokenkern.methods import registry

    return markdown.replace(MARKER, registry.table())
