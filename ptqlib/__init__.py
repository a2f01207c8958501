"""ptqlib."""
import os

# transformers (5.2x) swaps layers for kernels downloaded from the hub when a model loads (on CUDA: rotary
# embeddings, ...) unless told not to. A study's numbers must not depend on code fetched at run time, and
# offline (HF_HUB_OFFLINE=1) every load on a GPU failed with "kernels-community/rotary is not available".
# Set USE_HUB_KERNELS=1 in the environment to opt back in.
os.environ.setdefault("USE_HUB_KERNELS", "0")
