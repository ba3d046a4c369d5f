"""Known, harmless third-party noise kept off the user's terminal, each filter as narrow as it can be.

torch 2.14 logs a deprecation warning (``torch.utils._pytree``) each time torchao 0.18 registers its
``KernelPreference`` enum as a pytree constant, i.e. on every ``import torchao``. It is about torchao's
code, not the user's, and there is nothing they can do about it; every other pytree message still shows.
"""

from __future__ import annotations

import logging

PYTREE_LOGGER = "torch.utils._pytree"


class _KernelPreferenceFilter(logging.Filter):
    """Drops exactly torchao's ``KernelPreference`` register_constant deprecation record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not ("KernelPreference" in text and "register_constant" in text)


_FILTER = _KernelPreferenceFilter()


def quiet_torchao_import() -> None:
    """Install the filter (idempotent); call before torchao is first imported."""
    logger = logging.getLogger(PYTREE_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
