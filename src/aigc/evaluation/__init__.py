"""Reference evaluation: a per-dataset evaluator trained on its own train split, and the ``eval/*``
figures (FD, CLIP score, conditional accuracy, diversity, copying) it measures.

    from aigc.evaluation import reference_evaluator, evaluate_model
    ev = reference_evaluator("datasets/digits")  # trained once, cached in .cache/evaluators/
    result = evaluate_model(module, ev, "datasets/digits", num_samples=500, seed=0)
"""

from aigc.evaluation.evaluate import (
    COLLAPSE_BELOW,
    COPYING_ABOVE,
    comparable,
    evaluate_images,
    evaluate_model,
    evaluation_prompts,
    generate_images,
)
from aigc.evaluation.metrics import frechet_distance
from aigc.evaluation.nets import EvaluatorConfig
from aigc.evaluation.reference import ReferenceEvaluator, reference_evaluator, train_evaluator

__all__ = [
    "COLLAPSE_BELOW",
    "COPYING_ABOVE",
    "EvaluatorConfig",
    "ReferenceEvaluator",
    "comparable",
    "evaluate_images",
    "evaluate_model",
    "evaluation_prompts",
    "frechet_distance",
    "generate_images",
    "reference_evaluator",
    "train_evaluator",
]
