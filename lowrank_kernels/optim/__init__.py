from .decay_sgd import DecaySGD

__all__ = ["DecaySGD"]
