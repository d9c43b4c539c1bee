"""One inference path for the package: scoring, NLL, generation, multiple choice and routing probes.

Every command that runs a model over prompts (evaluation, export's report and calibration, LoRAHub's
objective, the demo's answers, ``mtlora analyze``'s routing) goes through this package, so batching, task ids,
EOS handling and numerics are decided once (layer: infra; imports only core, ``hub`` and ``data``).
"""

from mtlora.inference.batching import pad_id, pad_left, pad_right
from mtlora.inference.engine import (
    Choice,
    ChoiceRequest,
    Engine,
    Generation,
    GenRequest,
    NllResult,
    ScoreRequest,
    argmax_choice,
)
from mtlora.inference.examples import Example, encode_examples, prompt_ids
from mtlora.inference.probe import RoutingProbe
from mtlora.inference.records import RecordMetrics, answer_records, normalize_answer, score_records

__all__ = [
    "Choice",
    "ChoiceRequest",
    "Engine",
    "Example",
    "GenRequest",
    "Generation",
    "NllResult",
    "RecordMetrics",
    "RoutingProbe",
    "ScoreRequest",
    "answer_records",
    "argmax_choice",
    "encode_examples",
    "normalize_answer",
    "pad_id",
    "pad_left",
    "pad_right",
    "prompt_ids",
    "score_records",
]
