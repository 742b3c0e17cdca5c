"""A numpy forward pass of an Architecture in torch's layout (NCHW, OIHW weights): an oracle for the twin."""

import numpy as np

from hessian_approx.architecture import Architecture

NP_ACT = {"relu": lambda a: np.maximum(a, 0.0), "tanh": np.tanh, "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a))}


def conv2d(x, w, b, stride, pads):
    """x (N, C, H, W), w (O, C, kh, kw), b (O,) -> (N, O, H', W'), cross-correlation by explicit offsets."""
    ph, pw = pads
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    o, _, kh, kw = w.shape
    sh, sw = stride
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    out = np.zeros((x.shape[0], o, ho, wo)) + b[None, :, None, None]
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def pool(x, window, stride, reduce):
    """x (N, C, H, W) -> (N, C, H', W'), ``reduce`` (max or mean) over each window, no padding."""
    (kh, kw), (sh, sw) = window, stride
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    views = [x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return reduce(np.stack(views), axis=0)


def forward(arch: Architecture, state: dict, x_nchw: np.ndarray) -> np.ndarray:
    """Logits (N, C) from a torch-layout state dict {"{i}.weight", "{i}.bias"} and inputs (N, D) or NCHW."""
    h = x_nchw
    for i, layer in enumerate(arch.layers):
        if layer.kind == "dense":
            h = h @ state[f"{i}.weight"].T + state[f"{i}.bias"]
        elif layer.kind == "conv2d":
            h = conv2d(h, state[f"{i}.weight"], state[f"{i}.bias"], layer.stride, layer.pads(arch.shapes[i]))
        elif layer.kind in ("maxpool2d", "avgpool2d"):
            h = pool(h, layer.window, layer.stride, np.max if layer.kind == "maxpool2d" else np.mean)
        elif layer.kind == "flatten":
            h = h.reshape(h.shape[0], -1)  # NCHW: (c, h, w) order
        else:
            h = NP_ACT[layer.name](h)
    return h
