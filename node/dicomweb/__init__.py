"""The node as a DICOMweb origin (PS3.18): what the catalog records for queries (``attributes``),
QIDO-RS matching (``query``) over the catalog (``search``), and WADO-RS payloads from the spool
(``payload``). The HTTP routes are :mod:`node.http.qido` and :mod:`node.http.wado`."""
