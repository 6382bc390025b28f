"""The torch backend: plain PyTorch, chunked so that no (anchors x keys) tensor is stored; every
device and float dtype (the CPU and float64 path of ``backend="auto"``)."""
DTYPES = None


def unavailable_reason(device):
    return None
