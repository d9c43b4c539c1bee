"""Moved to :mod:`mtlora.inference.engine` (issue 16); this module keeps the old import path working."""

from mtlora.inference.engine import (
    Choice,
    ChoiceRequest,
    Engine,
    Generation,
    GenRequest,
    NllResult,
    ScoreRequest,
)

__all__ = ["Choice", "ChoiceRequest", "Engine", "GenRequest", "Generation", "NllResult", "ScoreRequest"]
