"""Installed versions of the libraries the hub runs on (status, warnings, compat checks)."""

from __future__ import annotations


def package_version(package: str) -> str | None:
    """The installed version of ``package``; None where it is not installed."""
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def upstream_version() -> str | None:
    """mlx-openai-server's version: which handler options and routes exist."""
    return package_version("mlx-openai-server")
