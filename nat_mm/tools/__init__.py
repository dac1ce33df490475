"""Command-line front ends: ``python -m nat_mm.tools.<name>`` (``tools/<name>.py`` in a clone).

Each parses its arguments and calls the package (:mod:`nat_mm.apis`, :mod:`nat_mm.analysis`,
:mod:`nat_mm.checkpoint`); bad input ends with ``error: <what> (<file or argument>)`` on stderr
and exit status 2 (:func:`nat_mm.tools.cli.run`).
"""
