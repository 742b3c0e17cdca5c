"""One exception type for every bad input: a one-line message naming the problem and the fix."""


class HessianApproxError(ValueError):
    """A user-facing error. ``str(err)`` is one line: what is wrong, then what to do.

    The command line prints it as ``error: <message>`` and exits with status 2,
    never with a traceback. Library callers can catch it like any ValueError.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}")


def check_finite(name: str, array) -> None:
    """Raise if ``array`` (numpy or jax, any shape) holds NaN or Inf.

    Args:
      name: what the array is, for the message (e.g. "weights of Dense_0/kernel").
      array: the values to check.
    """
    import numpy as np

    a = np.asarray(array)
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise HessianApproxError(
            f"{name} contain {bad} NaN or Inf value(s)",
            "retrain or reload a finite checkpoint, or clean the data",
        )
