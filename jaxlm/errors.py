"""The one error type a user of jaxlm can cause, and its specialisations.

Every mistake a user can make (a bad config value, a missing or corrupt file, a
checkpoint of another model) ends in one of these, with a one-line message that
names the thing and the fix. The command-line entry points print the message
alone, without a traceback.
"""

import argparse


class JaxlmError(Exception):
    """A problem the user can fix; its message is shown as it is."""


class ConfigError(JaxlmError):
    """A config field has an unknown name, a wrong type or an impossible value."""


class CheckpointError(JaxlmError):
    """A checkpoint is missing, damaged, unsafe or belongs to another model."""


class DataError(JaxlmError):
    """A data source or tokenizer cannot be read or does not fit the model."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors end in one line (``error: ...``, exit 2) like every jaxlm error.

    The stock parser prints its usage block first; ``--help`` still shows it.
    """

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind, low: float, inclusive: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    parse.__name__ = what
    return parse


# argparse ``type=`` for numeric flags: a bad number is refused with the flag's name, in one line.
positive_int = _number(int, 0, False, "an integer > 0")
non_negative_int = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a number > 0")
non_negative_float = _number(float, 0.0, True, "a number >= 0")


def positive_ints(text: str) -> list[int]:
    """``"1,64,256"``: comma-separated integers > 0."""
    return [positive_int(part.strip()) for part in text.split(",")]
