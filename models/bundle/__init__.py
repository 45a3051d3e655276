"""A safe reader and builder for MONAI bundle configs (``configs/inference.json|yaml`` + ``metadata.json``).

MONAI's own ``ConfigParser`` evaluates ``$`` strings with Python ``eval`` and lets ``_target_`` name any
callable, so a bundle could run arbitrary code. This package implements the same config language
(``@`` references with ``::`` or the old ``#`` separator, relative ``@::x``, ``%`` macros, ``_target_``,
``_requires_``, ``_disabled_``, ``_desc_``, ``_mode_`` "default", ``$`` expressions) without ever calling
``eval``/``exec``: expressions are parsed with :mod:`ast` and interpreted over a small grammar, and only
constructors and callables of an allow-list (:mod:`models.bundle.allow`) are built. ``imports``
(``$import ...``), ``logging.conf`` and ``scripts/`` are never executed. Data input (``LoadImage[d]``) and
output writing (``SaveImage[d]``) are the node's: inside a ``Compose`` they are left out and reported in
:attr:`BundleConfig.replaced`. MONAI's RetinaNet ``resnet_fpn_feature_extractor`` (torchvision inside) is
built by a torchvision-free equivalent (:mod:`models.bundle.compat`), so detection bundles build unchanged.

Reading and checking need neither torch nor MONAI (the node's ``check-config`` can call them); building
imports them lazily::

    from models.bundle import BundleConfig, load_weights
    cfg = BundleConfig.read(bundle_dir)            # metadata + configs/inference.json|yaml|yml; builds nothing
    cfg = BundleConfig.read(bundle_dir, ["inference", "site.yaml"],          # later files override (a#b keys)
                            overrides={"device": torch.device("cpu")})      # JSON-like = config, else an object
    cfg.metadata, cfg.name, cfg.version            # metadata.json
    cfg.channel_def                                # {0: "background", 1: "spleen"} (first output's channel_def)
    cfg.input_key, cfg.output_key                  # "image", "pred" (network_data_format inputs/outputs)
    cfg.check()                                    # network_def/preprocessing/inferer/postprocessing (those
    cfg.check("detector")                          # present) and all they reference: grammar + allow-list,
                                                   # no torch import; BundleConfigError naming the key
    "preprocessing" in cfg; cfg.raw("inferer")     # the config as read (macros expanded), nothing built
    cfg.get("network_def")                         # built, cached per id: Invertd's "@preprocessing" is the
                                                   # very Compose that cfg.preprocessing() returns
    cfg.network()                                  # network_def (CPU, not moved, not in eval mode)
    cfg.preprocessing() / cfg.postprocessing()     # Compose without LoadImage[d]/SaveImage[d] (a list is wrapped)
    cfg.inferer()                                  # e.g. SlidingWindowInferer(roi_size=..., overlap=...)
    cfg.replaced                                   # [Replaced(id="preprocessing::transforms::0",
                                                   #   target="LoadImaged", reason="data input is the node's ...")]
    cfg.weights_path()                             # checkpointloader::load_path if it evaluates inside the
                                                   # bundle ("$@bundle_root + '/models/' + @modelname"),
                                                   # else models/model.pt
    load_weights(network, cfg.weights_path())      # torch.load(weights_only=True) + load_state_dict

Errors: :class:`models.errors.BundleConfigError` (a :class:`~models.errors.BundleError`) with the file and
key, e.g. ``inference.json: preprocessing::transforms::0: _target_ 'os.system' is not allowed``.
"""

from __future__ import annotations

from models.bundle.config import RUN_IDS, BundleConfig
from models.bundle.resolve import Replaced
from models.bundle.weights import load_weights
from models.errors import BundleConfigError

__all__ = ["RUN_IDS", "BundleConfig", "BundleConfigError", "Replaced", "load_weights"]
