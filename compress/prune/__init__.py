"""The prune stage: channels and attention heads (torch-pruning), whole blocks
(LAPTOP-Diff), 2:4 sparsity, a ratio or a latency budget; KD recovery after each step."""
from compress.prune.channels import check, prune_channels  # noqa: F401
from compress.prune.config import LatencyTarget, PruneConfig  # noqa: F401
from compress.prune.stage import PruneStage  # noqa: F401
