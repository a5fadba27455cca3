"""The command line: click commands, the HTTP client that talks to a running hub, the terminal views.

The entry point is ``mlx_hub.cli.main:main``; this package imports nothing, so
``mlx_hub.cli.client`` stays light for scripts.
"""
