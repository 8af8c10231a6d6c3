"""The local latent explorer (``vaelab explore RUN_DIR``): a small server and one page.

The page shows the encoded test images on the plane of ``latent_scatter.png``, a point to
drag over that plane with the decoder mean at it (sliders for the remaining latent
directions), and, for a clicked test point, its input, reconstruction, NELBO and NLL.
Decoding happens in Python (:class:`Explorer`), so it works for every likelihood, model,
prior and posterior, grey or colour. The server is the standard library's, bound to
127.0.0.1 unless told otherwise (:mod:`vaelab.explore.server`). From Python::

    from vaelab.explore import Explorer, make_server, serve

    explorer = Explorer.open("runs/x", "best", points=2000)
    serve(make_server(explorer, "127.0.0.1", 0))   # prints the URL; Ctrl-C stops

or ``Explorer(model, test_imageset)`` for your own model.
"""

from __future__ import annotations

from .app import NELBO_SAMPLES, NLL_SAMPLES, POINTS, Z_LIMIT, Explorer, RequestError
from .server import (
    MAX_BODY,
    ExplorerServer,
    Response,
    display_available,
    handle_request,
    load_page,
    make_server,
    serve,
)

__all__ = [
    "Explorer",
    "RequestError",
    "ExplorerServer",
    "Response",
    "handle_request",
    "display_available",
    "load_page",
    "make_server",
    "serve",
    "MAX_BODY",
    "NELBO_SAMPLES",
    "NLL_SAMPLES",
    "POINTS",
    "Z_LIMIT",
]
