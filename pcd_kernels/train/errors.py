class TrainError(ValueError):
    """A problem the user can fix (a missing data directory, an unreadable checkpoint, an unknown
    model name, a bad setting): ``python -m pcd_kernels.train`` prints it without a traceback."""
