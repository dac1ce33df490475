"""The one error type nat_mm raises for bad input (a file, an argument, a config).

Every message reads ``<what> (<file or argument>)``; the command-line tools print it as
``error: <message>`` on stderr and exit with status 2 (``nat_mm.tools.cli``). It is a ValueError,
so library code that catches ValueError for bad arguments keeps working.
"""

from __future__ import annotations


class NatMMError(ValueError):
    """Bad input, explained for the user.

    Args:
        what: What is wrong, and what was expected.
        where: The file, folder or argument it concerns (shown in parentheses), or None.
    """

    def __init__(self, what: str, where: object = None) -> None:
        self.what = what
        self.where = where
        super().__init__(what if where is None else f'{what} ({where})')
