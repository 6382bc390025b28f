"""Drop-in shims for other distillation code bases. Each is imported on its own, lazily:
``import pcd_kernels`` never imports a framework, and importing a shim whose framework is missing
raises ImportError naming what to install.

- ``pcd_kernels.integrations.pcd``: the official PCD wrapper (``PCD(student, teacher, ...)``).
- ``pcd_kernels.integrations.cirkd``: CIRKD's ``CriterionMiniBatchCrossImagePair`` and
  ``StudentSegContrast``.
- ``pcd_kernels.integrations.mmrazor``: losses and a SpatialAdaptor connector in mmrazor's MODELS.
- ``pcd_kernels.integrations.torchdistill``: mid-level losses in torchdistill's registry.
"""
