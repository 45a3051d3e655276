"""The node's HTTP service: one ASGI app (FastAPI on uvicorn) started by ``dicom-node run``.

``app.py`` builds the app (routers, problem+json errors, OpenAPI at ``/openapi.json``, docs at
``/docs``); ``server.py`` runs it on a uvicorn thread (HTTPS with ``http.tls``); ``auth.py`` requires a
permission of every router but health (API tokens, ``oidc.py`` for OIDC JWTs); each router is a module of
its own.
"""
