"""graphpass passes: one module per pass, and the named pipelines that compose them."""

from passes import pipelines  # noqa: F401  (registers the pipelines with graphpass)

__all__ = ["pipelines"]
