"""The one reader of apt_lab's environment variables (and ``HF_HUB_OFFLINE``).

    APT_LAB_QUICK     1 → notebooks in quick mode, 0 → full mode (unset: quick without a GPU)
    APT_LAB_PRESET    preset of full mode (default "fast")
    APT_LAB_DATASET   benchmark the notebooks use in full mode (mvtec, visa, btad, mpdd)
    APT_LAB_DATA      folder holding the benchmarks (``<folder>/mvtec/...``); default ``~/.cache/apt_lab``
    APT_LAB_SOLUTIONS 1 → notebooks run their exercise solutions (default: only under pytest/nbval)
    HF_HUB_OFFLINE    1 → never try to download weights (a missing weight fails at once)

Example:
    >>> import os
    >>> os.environ["APT_LAB_EXAMPLE"] = "off"
    >>> env_flag("APT_LAB_EXAMPLE"), env_flag("APT_LAB_UNSET_EXAMPLE"), env_text("APT_LAB_UNSET_EXAMPLE", "x")
    (False, None, 'x')
"""
from __future__ import annotations

import os

_FALSE = ("0", "false", "no", "off")


def env_text(name: str, default: str | None = None) -> str | None:
    """The variable's value stripped, or ``default`` when it is unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_flag(name: str) -> bool | None:
    """True/False from a variable ("0", "false", "no", "off" are False; anything else True); None when unset."""
    value = env_text(name)
    return None if value is None else value.lower() not in _FALSE


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads."""
    return bool(env_flag("HF_HUB_OFFLINE"))
