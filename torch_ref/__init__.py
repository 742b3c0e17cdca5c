"""PyTorch reference side: the twin MLP, exact Hessians by autograd, PyHessian/BackPACK runners (import submodules)."""
