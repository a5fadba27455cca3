"""``python -m mlx_hub.cli``: the same commands as ``mlx-openai-server-hub``."""

from mlx_hub.cli.main import main

main()
