"""The torch custom ops ``gconvgen::conv2d``, ``conv2d_act`` and the three gradient ops, with their
autograd, forward-AD and vmap rules: the one door from torch into a compiled kernel. Importing this
package registers all of them (their formulas refer to one another)."""
from . import backward, conv2d, fused  # noqa: F401
