"""Analysis of a trained model: everything is a question to an :class:`Objective`."""

from flatlens.measure.objective import Objective
from flatlens.measure.params import ParamSpace

__all__ = ["Objective", "ParamSpace"]
