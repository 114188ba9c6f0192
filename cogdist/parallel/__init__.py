"""Parallelism inside one gang: the process group and mesh, sequence parallelism of the
transformer, classifier-free-guidance parallelism, once-per-sample stages and distributed VAE
decode. Each is a plain function over a model (or pipeline) and a group, testable alone."""
