"""The project's one exception tree. Every error the node, its workers or its models raise on purpose
is one of these; each layer catches them by class, never by message.

It lives in the bottom package (``models``) so that every layer above can raise and catch it::

    DicomNodeError                    base class of everything below
    ├── ConfigError                   the configuration cannot be used: ``check-config`` and the
    │   │                             commands exit 2 with the message, which names the key
    │   ├── UnknownModelError         a rule or ``models:`` entry names a model the registry lacks
    │   ├── ModelOptionsError         options a model cannot honour, or a configured path that is missing
    │   └── MissingExtraError         the model needs an optional extra (``pip install dicom-ai-node[ml]``)
    │                                 that is not installed; also a PermanentModelError in a worker
    ├── InputError                    this input cannot be used: a job is ``skipped`` with the reason,
    │   │                             a received object is refused; never retried
    │   ├── UnsuitableInput           the model declines the series (modality, slices, spacing, tilt...)
    │   └── UnreadableInput           the files cannot be made into a volume (malformed geometry, pixels)
    ├── ModelError                    a model failed on input it accepted
    │   ├── TransientModelError       may succeed on another attempt: retried with backoff
    │   └── PermanentModelError       fails the same way every time: the job is ``failed`` at once
    │       ├── BundleError           a MONAI bundle or TorchScript file cannot be loaded (names the file)
    │       │   └── BundleConfigError     a bundle config is refused or unresolvable (names file and key)
    │       ├── ManifestError         a model manifest is missing or invalid
    │       └── MissingExtraError     (see ConfigError)
    ├── StorageError                  the spool could not store a file (C-STORE 0xA700, STOW-RS 503)
    ├── RetrieveError                 the PACS could not be queried or retrieved from (priors)
    └── SendError                     a result could not be delivered: the delivery stays pending
        └── DestinationUnreachable    no association / connection: the whole batch is tried again

How a job ends is decided in one place, :func:`workers.pipeline.job_outcome`, from these classes:
InputError -> skipped; ConfigError or ModelError other than TransientModelError -> failed; any
other exception (TransientModelError, an OSError, a bug) -> retried until ``queue.job_max_attempts``.
Per-object refusals by a destination are not exceptions: senders report them in ``SendReport.failed``.
Messages never carry patient data (tag values).
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration cannot be used; the message names the key."""


class UnknownModelError(ConfigError, KeyError, ValueError):
    """A model name that is not registered; the message lists the known models."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown model"


class ModelOptionsError(ConfigError, ValueError):
    """Options a model cannot honour, or a configured path that does not exist (the message says which)."""


class InputError(DicomNodeError, ValueError):
    """The input cannot be used (job skipped with the reason, object refused); never retried."""


class UnsuitableInput(InputError):
    """The series is not something this model accepts (wrong modality, too few slices, ...)."""


class UnreadableInput(InputError):
    """The files of a series cannot be made into a volume (malformed geometry, pixel data, ...)."""


class ModelError(DicomNodeError):
    """A model failed on an input it accepted. Not retried unless it is a :class:`TransientModelError`."""


class TransientModelError(ModelError):
    """A failure that another attempt may not repeat (out of GPU memory, a busy device): retried."""


class PermanentModelError(ModelError):
    """A failure every attempt would repeat (broken bundle, missing weights or extra): failed at once."""


class BundleError(PermanentModelError, ValueError):
    """A bundle directory or TorchScript file cannot be loaded safely (the message names the file)."""


class BundleConfigError(BundleError):
    """A bundle config item is refused (not allow-listed, outside the expression grammar) or cannot be
    resolved (missing reference, cycle); the message names the file and the ``::``-separated key."""


class ManifestError(PermanentModelError, ValueError):
    """A manifest file is missing, not YAML, or does not match the schema."""


class MissingExtraError(ModelOptionsError, PermanentModelError):
    """A model needs Python packages of an optional extra that this installation lacks."""


class StorageError(DicomNodeError):
    """The spool could not store a file (disk full, below the floor, I/O error)."""


class RetrieveError(DicomNodeError):
    """The PACS could not be queried or retrieved from; the message carries no tag values."""


class SendError(DicomNodeError):
    """A result could not be delivered; the delivery stays pending and is retried."""


class DestinationUnreachable(SendError):
    """Could not associate with / connect to the destination."""


class NotificationError(DicomNodeError):
    """A notification (webhook, e-mail) could not be sent; it stays in the outbox and is retried."""
