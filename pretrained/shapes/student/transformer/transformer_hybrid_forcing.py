# Remote-code shim written by diffusers_hybrid: the code lives in the `diffusers-hybrid` package.
from diffusers_hybrid import HybridForcingTransformer3DModel  # noqa: F401
