"""Fast paths for ravine's optimizers, chosen automatically and checked against the
plain path: :mod:`ravine.kernels.cpu` (the compiled CPU step) and
:mod:`ravine.kernels.fast` (which parameters and options it takes)."""
