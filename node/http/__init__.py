"""The node's HTTP service: one ASGI app (FastAPI on uvicorn) started by ``dicom-node run``.

``app.py`` builds the app (routers, problem+json errors, OpenAPI at ``/openapi.json``, docs at
``/docs``); ``server.py`` runs it on a uvicorn thread; each router is a module of its own.
"""
