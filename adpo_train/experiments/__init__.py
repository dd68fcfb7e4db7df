"""Small, self-contained experiments that check the method's claims on known ground truth.

* :mod:`adpo_train.experiments.label_flip`: label-flip robustness and minority detection
  on a 2-D toy diffusion problem (``adpo-train experiment label-flip`` or
  ``python -m adpo_train.experiments.label_flip``); results in ``docs/method-study.md``.
"""
