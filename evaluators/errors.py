"""Error types raised by the evaluators package.

Contract: every configuration mistake a user can make (a missing data folder, an
unknown dataset name, an impossible sample count, an unavailable device) raises
:class:`EvaluatorConfigError`, whose message names the offending config field
(``data.root``, ``data.name``, ``evaluator.device`` ...) and says how to fix it.
"""

from __future__ import annotations


class EvaluatorConfigError(ValueError):
    """A configuration value given to the evaluators package is invalid.

    Subclasses :class:`ValueError`, so callers that already catch ``ValueError``
    keep working. The message always names the config field and the fix.
    """
