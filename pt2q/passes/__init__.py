"""Graph passes, one per file, each a class with `call(graph_module) -> PassResult`."""
from .manager import PassManager, PassRecord, PassResult, observe_passes
from .matmul_to_linear import MatmulToLinear
from .torchao_convert import TorchaoConvert
from .torchao_prepare import TorchaoPrepare

__all__ = ["MatmulToLinear", "PassManager", "PassRecord", "PassResult", "TorchaoConvert", "TorchaoPrepare",
           "observe_passes"]
