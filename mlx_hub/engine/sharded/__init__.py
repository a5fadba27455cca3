"""One model served by an MLX distributed group: its ranks' places, processes and entry point.

``hosts.py`` places the ranks, ``group.py`` launches, watches and ends them from the
hub's loop, and ``rank.py`` is what each rank runs (mlx-lm's distributed server).
The hub's own process never joins a collective, so a dead or stalled peer can
only fail this one model.
"""
