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


class RunMismatchError(RuntimeError):
    """A run folder holds a different run (config, data, shots, seeds, methods, backbone or version): resuming it
    would mix results. The message says how to resume it or start afresh."""


class RunInUseError(RuntimeError):
    """Another live process holds the run folder's lock; the message names its pid and what to do."""


class ConfigError(ValueError):
    """A configuration value out of its range (e.g. ``train.steps=-1``, ``score.temperature=0``); names the field."""


class UnsafeNameError(ValueError):
    """A category name or a path from a split file that would leave the dataset root or the run folder."""


class DatasetCheckError(ValueError):
    """A dataset cannot give meaningful metrics (one class only, a mask of the wrong size), found before tuning."""


class IncompleteDatasetError(ValueError):
    """A dataset folder or archive misses categories or files of the expected manifest; it is never "ready"."""


class CorruptArchiveError(ValueError):
    """A downloaded or local archive is truncated or corrupt (bad header, checksum); nothing was extracted."""


class ArchiveLimitError(ValueError):
    """An archive would extract more bytes or members than the limits allow (a zip bomb?); nothing was extracted."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than the decoding limit; the message says how to raise the limit."""


class CorruptFileError(ValueError):
    """A saved file (prompts, run results) cannot be parsed; the message names the path."""
