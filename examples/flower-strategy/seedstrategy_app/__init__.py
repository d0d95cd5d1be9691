"""Example Flower App using fwdkern's SeedStrategy (see ../pyproject.toml)."""
