"""Evaluation: refusal judges, plug-in evaluations (`config.evals`), statistics, reports.

  from semsafe_jax.eval import get_evaluator, run_evals, ModelUnderTest, EvalContext
"""

from semsafe_jax.eval.base import (
                                   EvalContext,
                                   EvalResult,
                                   Metric,
                                   ModelUnderTest,
                                   base_cache_file,
                                   check_config,
                                   eval_specs,
                                   get_evaluator,
                                   run_evals,
)

__all__ = ["EvalContext", "EvalResult", "Metric", "ModelUnderTest", "base_cache_file",
           "check_config", "eval_specs", "get_evaluator", "run_evals"]
