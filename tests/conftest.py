"""Options shared by every test: `pytest --update-goldens` rewrites golden files instead of comparing.

Goldens (plans, rendered diagnostics, CLI help) change only when someone asks for it with this flag
and commits the result; a plain run never writes them.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite tests/golden/* and tests/bad_specs/*.expected from the current compiler")


@pytest.fixture
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")
