"""The submodular toolbox (methods.md B3): objectives — one file each — and greedy optimizers, a
separate axis, as in apricot. Large pools use a sparse kNN graph (``knn.py``) as the kernel.
``maximize(objective, budget, optimizer)`` gives the ranking and the gains."""

from curate.select.submodular.facility_location import FacilityLocation
from curate.select.submodular.graph_cut import GraphCut
from curate.select.submodular.kernels import DenseKernel, EmbeddingKernel, SparseKernel
from curate.select.submodular.knn import KnnGraph, build_knn_graph
from curate.select.submodular.log_determinant import LogDeterminant
from curate.select.submodular.optimizers import GreedyResult, incremental_greedy, lazy_greedy, maximize, naive_greedy, stochastic_greedy

__all__ = ["DenseKernel", "EmbeddingKernel", "FacilityLocation", "GraphCut", "GreedyResult", "KnnGraph", "LogDeterminant", "SparseKernel",
           "build_knn_graph", "incremental_greedy", "lazy_greedy", "maximize", "naive_greedy", "stochastic_greedy"]
