"""The one error type a user of jaxlm can cause, and its specialisations.

Every mistake a user can make (a bad config value, a missing or corrupt file, a
checkpoint of another model) ends in one of these, with a one-line message that
names the thing and the fix. The command-line entry points print the message
alone, without a traceback.
"""


class JaxlmError(Exception):
    """A problem the user can fix; its message is shown as it is."""


class ConfigError(JaxlmError):
    """A config field has an unknown name, a wrong type or an impossible value."""


class CheckpointError(JaxlmError):
    """A checkpoint is missing, damaged, unsafe or belongs to another model."""


class DataError(JaxlmError):
    """A data source or tokenizer cannot be read or does not fit the model."""
