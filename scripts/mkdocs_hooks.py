"""mkdocs hooks (see mkdocs.yml ``hooks:``): read apt_lab's ``Example:`` docstring sections as examples.

apt_lab's docstrings title their doctest sections ``Example:`` (singular). Griffe's Google parser knows only
``Examples:`` and would render the singular form as an admonition of plain markdown, where ``>>>`` lines become
block quotes and doctest output like ``[1, 0]`` looks like reference links. This hook maps the singular title to
the same section kind, so both render as highlighted code.
"""
from __future__ import annotations

import logging

log = logging.getLogger("mkdocs.hooks.apt_lab")


def on_startup(command, dirty):  # noqa: ARG001 - mkdocs hook signature
    try:
        from griffe import DocstringSectionKind
        from griffe._internal.docstrings import google
    except ImportError:  # a griffe without this layout: leave the default behaviour
        log.info("griffe internals moved; 'Example:' sections render as admonitions")
        return
    google._section_kind.setdefault("example", DocstringSectionKind.examples)
