"""Errors apt_lab raises on purpose; each message says what was wrong and what to do."""


class UnknownBackboneError(ValueError):
    """A model name or pretrained tag that open_clip does not know, or an architecture apt_lab cannot use."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable (offline). The message says how to supply them."""
