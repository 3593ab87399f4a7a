"""Probes: the per-layer safety probe and the learned refusal scorers' training."""

from semsafe_jax.probes.refusal import (
                                        load_classifier,
                                        save_classifier,
                                        token_embedding_features,
                                        train_classifier_on_features,
                                        train_refusal_classifier,
                                        train_refusal_probe,
)
from semsafe_jax.probes.safety import (
                                        PROBE_USES,
                                        encode_prompts,
                                        fit_safety_probe,
                                        flag_unlabeled,
                                        layer_probe,
                                        load_probe,
                                        pooled_hidden_states,
                                        probe_accuracy,
                                        probe_pair_weights,
                                        probe_probs,
                                        save_probe,
                                        score_prompts,
                                        train_layer_probes,
                                        write_probe_report,
)

__all__ = [
    "PROBE_USES", "encode_prompts", "fit_safety_probe", "flag_unlabeled", "layer_probe",
    "load_classifier", "load_probe", "pooled_hidden_states", "probe_accuracy",
    "probe_pair_weights", "probe_probs", "save_classifier", "save_probe", "score_prompts",
    "token_embedding_features", "train_classifier_on_features", "train_layer_probes",
    "train_refusal_classifier", "train_refusal_probe", "write_probe_report",
]
