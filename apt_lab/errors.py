"""Every exception apt_lab raises on purpose; each message says what was wrong and what to do.

This module imports nothing heavy, so catching an apt_lab error never loads torch.
"""


class UnknownBackboneError(ValueError):
    """A model name or pretrained tag that open_clip does not know, or an architecture apt_lab cannot use."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable (offline). The message says how to supply them."""


class ManualDownloadRequired(RuntimeError):
    """The dataset needs a manual step (licence form, Google Drive); the message says which."""


class StopTraining(Exception):
    """Raise from a tuning callback to end tuning early; ``tune_prompts`` returns the result so far (interrupted)."""


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite. ``error.result`` holds the ``TuneResult`` of the steps before it."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
