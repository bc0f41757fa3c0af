"""Bad input and how it is reported: the input-error classes, the exit codes, the one line.

Bad input (a config value, a data file, a checkpoint, LoRA targets) is refused before anything
is trained or written: the command prints `lora_sweep: error: <problem and the fix>` on one
stderr line and exits with `EXIT_BAD_INPUT`. A run that started and failed exits `EXIT_FAILED`.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
ERROR_PREFIX = "lora_sweep: error: "


class InputError(ValueError):
    """Bad input, refused before training; the message names the key or file and the fix."""


class ConfigError(InputError):
    """An invalid configuration value; the message is one line naming the key and the fix."""


class DataError(InputError):
    """Bad training data; the message names the file, the record and the field."""


class ModelError(InputError):
    """The checkpoint cannot be used; the message names the path and the fix."""


class LoraTargetError(InputError):
    """`lora.target_modules` or `lora.r` do not fit the model's layers."""


INPUT_ERRORS: tuple[type[InputError], ...] = (ConfigError, DataError, ModelError, LoraTargetError)
"""Every kind of bad input: what the CLI and the job refuse without writing a row."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (its type name when it has none): the cause
    quoted inside one of our own one-line messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_line(err: BaseException) -> str:
    """Fold a (possibly multi-line) Hydra or validation error into one readable line."""
    parts: list[str] = []
    options: list[str] = []
    in_options = False
    for raw in str(err).splitlines():
        line = raw.strip()
        if line.startswith(("Config search path", "full_key:", "object_type=", "Set the environment variable")):
            break
        if line.startswith("Available options"):
            in_options, parts = True, parts + [line.rstrip(":")]
            continue
        if in_options and line:
            options.append(line)
        elif line:
            parts.append(line.rstrip("."))
    text = "; ".join(parts) if parts else type(err).__name__
    return f"{text}: {', '.join(options)}" if options else text


def error_message(err: BaseException) -> str:
    """The whole stderr line for a refused input: `lora_sweep: error: <error_line>`."""
    return ERROR_PREFIX + error_line(err)
