"""Speed and memory of the in-process hub against a process per model and bare mlx-lm."""
