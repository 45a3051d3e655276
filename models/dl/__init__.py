"""The shared deep-learning runtime (torch + MONAI) of the four ``dl-*`` models and of site models.

The submodules import torch and MONAI; this package itself does not, so the node process (which
never imports torch) can list and validate these models through :mod:`models.registry`.

* the models themselves live in their own folders, next to their manifest and demo bundle:
  :mod:`models.dl_ct_segmentation` (3-D U-Net, sliding window),
  :mod:`models.dl_lung_nodule_detection` (centre heatmap + NMS),
  :mod:`models.dl_emphysema_classification` (3-D CNN classifier),
  :mod:`models.dl_ct_registration` (CNN regressing a rigid transform);
* :mod:`models.dl.core`: what the four share (:class:`models.dl.core.DlModel`);
* :mod:`models.dl.runtime`: orientation, resampling, device and precision helpers;
* :mod:`models.dl.bundle`: loading the ``dl-*`` models' MONAI bundles (network built by the safe
  resolver :mod:`models.bundle`) or TorchScript files;
* :mod:`models.dl.bundle_model`: :class:`~models.dl.bundle_model.BundleSegmentation`, which runs a
  site model (:mod:`models.site`): a site's MONAI bundle unchanged (its own pre/post-processing and
  inferer, Invertd back to the source grid) or a TorchScript file.

Synthetic cases and held-out accuracy are test fixtures, outside the product:
:mod:`testkit.dl_synth` and :mod:`testkit.dl_evaluate`.

Demo weights live in ``models/dl_<name>/`` and are made by ``python -m tools.train_demo_models``;
they are demonstration models trained on synthetic phantoms, not clinical models.
"""
