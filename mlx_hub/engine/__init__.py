"""The engine layer: what loads, runs, measures and frees models.

``base`` is the interface the core sees; ``mlx`` the real engine; ``memory``,
``model_files``, ``reservation`` and ``weights`` its parts; ``patches`` every
change made to another library's objects. Importing the package imports no MLX.
"""
