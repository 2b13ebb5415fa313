"""peftlab's version (one place: the package, the run record and pyproject.toml's dynamic version read it)."""

__version__ = "0.1.0"
