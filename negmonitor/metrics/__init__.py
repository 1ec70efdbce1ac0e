"""Pure, vectorised per-neuron maths: WD to a Gaussian (exact and streaming), mapping difficulty, drift, ranking.

No model code lives here: every function takes ``[tokens, neurons]`` (or pair / weight) tensors and returns
tensors or plain numbers, vectorised over neurons.
"""

from negmonitor.metrics.drift import weight_drift
from negmonitor.metrics.mapping import (
    mapping_difficulty,
    pair_sign_shares,
    sample_pairs,
    sign_classes,
    top_pairs,
)
from negmonitor.metrics.ranking import bottom_k_indices, count_for_fraction, jaccard, top_k_indices
from negmonitor.metrics.streaming import NeuronStatsAccumulator
from negmonitor.metrics.wasserstein import (
    w1_points_to_gaussian,
    wasserstein_to_gaussian,
    wasserstein_to_gaussian_split,
)

__all__ = [
    "NeuronStatsAccumulator",
    "bottom_k_indices",
    "count_for_fraction",
    "jaccard",
    "mapping_difficulty",
    "pair_sign_shares",
    "sample_pairs",
    "sign_classes",
    "top_k_indices",
    "top_pairs",
    "w1_points_to_gaussian",
    "wasserstein_to_gaussian",
    "wasserstein_to_gaussian_split",
    "weight_drift",
]
