"""numba kernels (private).  Kernels take arrays and scalars only: no validation, no Python objects."""
