"""Errors a user can act on, and the exit codes the CLI maps them to.

Exit codes (every command): 0 success, 1 the command ran but a check failed
(e.g. verification mismatch), 2 bad usage or bad input.
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


class NormfoldError(Exception):
    """A problem with the user's input or environment; the message is one line
    saying what is wrong and what to do. The CLI prints it and exits with 2."""

    exit_code = EXIT_BAD_INPUT


class CheckFailed(NormfoldError):
    """The command ran, but the result failed a check (exit code 1)."""

    exit_code = EXIT_CHECK_FAILED


class ProviderUnavailable(NormfoldError):
    """The execution provider asked for cannot run here (no GPU, no CUDA libraries). `what`
    says why; the message adds what to do, and the CLI names the option that chose it."""

    def __init__(self, what: str):
        super().__init__(f"{what}; use the cpu provider")
        self.what = what

    def for_option(self, option: str) -> str:
        """The message naming `option` (e.g. --provider) as the way to choose the cpu provider."""
        return f"{self.what}; use {option} cpu"
