"""Where the data shipped with gconvgen lives: inside the wheel (gconvgen/<packaged>), else the checkout."""
from __future__ import annotations

import functools
from pathlib import Path

_PACKAGE = Path(__file__).parent
# checkout folder -> the name it ships under inside the wheel (pyproject.toml, force-include)
_SHIPPED = {"templates": "templates", "tuning": "tuning_data"}


@functools.cache
def data_dir(name: str) -> Path:
    """The folder ``name`` ('templates' or 'tuning') of an installed wheel or of the source checkout."""
    for candidate in (_PACKAGE / _SHIPPED[name], _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"gconvgen's {name}/ folder is missing next to {_PACKAGE}; reinstall gconvgen")
