"""PyTorch reference side: the twin of an Architecture, exact Hessians by autograd, PyHessian/BackPACK runners (import submodules)."""
