"""The MNIST pipeline's stages: fetch -> prepare -> train -> evaluate (see dvc.yaml)."""
