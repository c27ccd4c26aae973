"""gconvgen inside other systems: the torch.compile backend "gconvgen" and its graph rewrites."""
