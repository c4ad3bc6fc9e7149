"""Graph passes, one per file, each a class with `call(graph_module) -> PassResult`."""
from .manager import PassManager, PassRecord, PassResult
from .matmul_to_linear import MatmulToLinear

__all__ = ["MatmulToLinear", "PassManager", "PassRecord", "PassResult"]
