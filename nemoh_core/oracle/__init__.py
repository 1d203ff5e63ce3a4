"""The oracle: one readable fp32/fp64 PyTorch function per Nemotron-H op (`ops`), an interpreter that
walks the IR with them (`interpreter`), and the transformers reference loader (`reference`).

`from nemoh import oracle; oracle.run(graph, params, ids)` is the definition every executor is
measured against.
"""

from nemoh.oracle.interpreter import OracleState, run, run_block
from nemoh.oracle.ops import (
                              attention,
                              causal_conv1d,
                              discretize_dt,
                              embedding,
                              expand_groups,
                              gated_rmsnorm,
                              linear,
                              moe_experts,
                              moe_router,
                              relu2,
                              rmsnorm,
                              ssd_chunked,
                              ssd_recurrent,
)

__all__ = ["OracleState", "run", "run_block", "attention", "causal_conv1d", "discretize_dt", "embedding",
           "expand_groups", "gated_rmsnorm", "linear", "moe_experts", "moe_router", "relu2", "rmsnorm", "ssd_chunked",
           "ssd_recurrent"]
