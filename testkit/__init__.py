"""Test fixtures: CT phantoms, synthetic DICOM writers, evaluation helpers and process harnesses.

Used by tests/, bench/, tools/ and ``dicom-node models evaluate``. The product (node/, workers/,
models/) never imports it, except ``dicom-node models evaluate``, which imports
:mod:`testkit.evaluate` (and :mod:`testkit.dl_evaluate`) lazily inside the command.

* :mod:`testkit.phantom`: the synthetic chest CT phantom with known truth.
* :mod:`testkit.dicom`: writes a phantom as a DICOM CT Image Storage series.
* :mod:`testkit.dl_synth`: synthetic training and evaluation cases for the deep-learning models.
* :mod:`testkit.evaluate`, :mod:`testkit.dl_evaluate`: held-out accuracy of the classical and
  deep-learning models.
* :mod:`testkit.harness`: real processes on loopback (Orthanc, redis-server, the node, dcmtk).
"""
