"""Model compression: SVD factorization, channel pruning, sparsity, clustering, and keeping them through QAT.

One module per job:

* :mod:`.prepare`: traced, BatchNorm-folded copy every pass edits;
* :mod:`.svd`: weight SVD and spatial SVD of one layer; :mod:`.channel_units` / :mod:`.channel_pruning`:
  prunable channel sets and pruning with least-squares re-fit;
* :mod:`.spaces` / :mod:`.selection`: per-layer ratios, greedy (AIMET) or manual, against a MAC or
  parameter target; :mod:`.cost`: per-layer MACs and parameters of a float model;
* :mod:`.sparsity` (magnitude, 2:4, channel), :mod:`.schedule` (polynomial gradual pruning),
  :mod:`.clustering` (k-means weight sharing), :mod:`.preserve` (PQAT/CQAT/PCQAT step hook);
* :mod:`.steps` / :mod:`.pipeline`: step configs and the prune -> cluster pipeline with fine-tuning;
* :mod:`.size` (dense and gzip sizes), :mod:`.plot` (sensitivity figure).
"""

from .channel_pruning import ChannelPruningConfig, prune_channels
from .channel_units import ChannelUnit, find_channel_units
from .clustering import cluster_tensor, cluster_weights
from .cost import layer_costs, total_cost
from .pipeline import CompressContext, CompressResult, MethodRegistry, compress_model, default_methods
from .prepare import prepare_for_compression
from .preserve import structure_counts, structure_preserver
from .schedule import GradualPruningHook, PolynomialDecay
from .selection import Selection, SelectionError, greedy_selection, manual_selection, select_from_table
from .size import float_sizes, quantized_sizes
from .sparsity import channel_mask, magnitude_mask, n_m_mask, sparsify
from .spaces import ChannelPruningSpace, SvdSpace
from .steps import CompressConfigError, parse_step
from .svd import factorize, full_rank, svd_eligible

__all__ = [
    "ChannelPruningConfig", "ChannelPruningSpace", "ChannelUnit", "CompressConfigError", "CompressContext",
    "CompressResult", "GradualPruningHook", "MethodRegistry", "PolynomialDecay", "Selection", "SelectionError",
    "SvdSpace", "channel_mask", "cluster_tensor", "cluster_weights", "compress_model", "default_methods",
    "factorize", "find_channel_units", "float_sizes", "full_rank", "greedy_selection", "layer_costs",
    "magnitude_mask", "manual_selection", "n_m_mask", "parse_step", "prepare_for_compression", "prune_channels",
    "quantized_sizes", "select_from_table", "sparsify", "structure_counts", "structure_preserver", "svd_eligible",
    "total_cost",
]
