"""What every benchmark module shares with the harness."""


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def cuda_extension_reason(device: str):
    """Why backend='cuda' cannot run on ``device`` here, or None when it can."""
    if device != "cuda":
        return "the CUDA extension's kernels need CUDA tensors"
    from pcd_kernels import _cuda

    return _cuda.unavailable_reason()
