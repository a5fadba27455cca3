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


def release_in(version: str | None, releases: str) -> bool:
    """Whether ``version`` (None: not installed) is one of ``releases``, a PEP 440 specifier such as ``<0.5``."""
    from packaging.specifiers import SpecifierSet

    return version is not None and SpecifierSet(releases).contains(version, prereleases=True)


#: The library combinations the hub's suite runs on (README: "Tested versions"): the newest
#: stack it declares, and upstream's own pins for users who keep them (the compat run).
TESTED_STACKS: tuple[dict[str, str], ...] = (
    {"mlx-openai-server": "==1.8.1", "mlx-lm": ">=0.32.2,<0.33", "mlx-vlm": ">=0.7.10,<0.8"},
    {"mlx-openai-server": "==1.8.1", "mlx-lm": "==0.31.*", "mlx-vlm": "==0.4.*"},
    {"mlx-openai-server": "==1.6.3", "mlx-lm": "==0.31.*", "mlx-vlm": "==0.4.*"},
)


def installed_stack() -> dict[str, str | None]:
    """The installed release of each library a tested stack names."""
    return {package: package_version(package) for package in TESTED_STACKS[0]}


def untested_stack(installed: dict[str, str | None] | None = None) -> str | None:
    """A warning naming the installed versions where they match no tested stack; None where one matches.

    The hub runs regardless: a newer mlx-lm usually works, and refusing it would
    leave a user with nothing. The warning says what to report if it does not.
    """
    installed = installed_stack() if installed is None else installed
    if any(all(release_in(installed.get(p), spec) for p, spec in stack.items()) for stack in TESTED_STACKS):
        return None
    have = ", ".join(f"{p} {v or 'missing'}" for p, v in installed.items())
    tested = "; ".join(", ".join(f"{p}{s}" for p, s in stack.items()) for stack in TESTED_STACKS)
    return f"untested combination: {have} (tested: {tested}); the hub runs, but report problems with these versions"


def library_versions() -> dict[str, str | None]:
    """Every MLX library the hub runs on, as the README's tested-versions table names them."""
    names = ("mlx", "mlx-lm", "mlx-vlm", "mlx-embeddings", "mlx-whisper", "mlx-openai-server")
    return {name: package_version(name) for name in names}
