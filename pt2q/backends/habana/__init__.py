"""Habana (Gaudi) backend: pt2q's FP8 Q/DQ graph lowered to Gaudi's cast_to_fp8_v2 / fp8_gemm_v2 /
cast_from_fp8. Here (no HPU) they are pt2q's CPU reference ops `torch.ops.pt2q_gaudi2.*` /
`pt2q_gaudi3.*`, with the HPU signatures; with Habana's bridge installed, `torch.ops.hpu.*`."""
from . import ops
from .lowering import LOWERINGS, HabanaLoweringReport, Lowering, LowerToHabana, hpu_unavailable_reason, lower

__all__ = ["LOWERINGS", "HabanaLoweringReport", "LowerToHabana", "Lowering", "hpu_unavailable_reason", "lower", "ops"]
