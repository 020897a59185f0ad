# Shared checks of the GPU benchmark scripts (sourced): a CUDA GPU and the data must be there.
#   require_gpu_and_data SCRIPT_NAME
require_gpu_and_data() {
  if [ "$DEVICE" = cuda ] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "$1: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a GPU machine." >&2
    exit 1
  fi
  if [ ! -f "$DATA/cifar-100-python/train" ]; then
    echo "$1: CIFAR-100 not found under $DATA/cifar-100-python; pass its parent folder as the first argument." >&2
    exit 1
  fi
}
