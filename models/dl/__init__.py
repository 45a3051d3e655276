"""Deep-learning models (torch + MONAI): segmentation, detection, classification, registration.

The submodules import torch and MONAI; this package itself does not, and neither does
:mod:`models.dl.evaluate` at import time, so the node process (which never imports torch) can
list and validate these models through :mod:`models.registry`.

* :mod:`models.dl.segmentation`: ``dl-ct-segmentation`` (3-D U-Net, sliding window);
* :mod:`models.dl.detection`: ``dl-lung-nodule-detection`` (centre heatmap + NMS);
* :mod:`models.dl.classification`: ``dl-emphysema-classification`` (3-D CNN classifier);
* :mod:`models.dl.registration`: ``dl-ct-registration`` (CNN regressing a rigid transform);
* :mod:`models.dl.bundle`: loading MONAI-style bundles / TorchScript with whitelisted networks;
* :mod:`models.dl.synth`, :mod:`models.dl.evaluate`: synthetic cases and held-out accuracy.

Demo weights live in ``models/dl_<name>/`` and are made by ``tools/train_demo_models.py``;
they are demonstration models trained on synthetic phantoms, not clinical models.
"""
