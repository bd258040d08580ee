"""One reward interface over every reward model and the simulated world's judges."""
from raypref.rewards.base import (GENERIC_USER, RewardFunction, UnknownUserError,
                                  UnsupportedUserError, UserRef, fit_weights)

__all__ = ["GENERIC_USER", "RewardFunction", "UnknownUserError", "UnsupportedUserError",
           "UserRef", "fit_weights"]
