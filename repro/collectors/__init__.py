"""Evidence collectors: host stacks, GPU kernel state, the environment."""
