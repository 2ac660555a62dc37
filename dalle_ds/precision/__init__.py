"""Mixed precision as in the DALL-E paper (§2.4, Appendices B.2 and D): per-resblock gradient scaling for fp16
branches, and AdamW with 16-bit moments."""
from dalle_ds.precision.adam_moments import AdamW16
from dalle_ds.precision.native import bf16_is_native
from dalle_ds.precision.resblock_scaling import (ResblockGradScaler, install_unscale_hooks, scaled_branch_input,
                                                 scaled_branch_output, unscale_block_grads_)

__all__ = ["AdamW16", "ResblockGradScaler", "bf16_is_native", "install_unscale_hooks", "scaled_branch_input", "scaled_branch_output",
           "unscale_block_grads_"]
