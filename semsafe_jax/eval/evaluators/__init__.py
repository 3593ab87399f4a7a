"""Evaluation plug-ins: one module per `config.evals.<name>.type`.

Each module exposes `OPTIONS` (allowed options with their defaults) and
`evaluate(ctx: EvalContext, model: ModelUnderTest, opts: dict) -> EvalResult`.
"""
