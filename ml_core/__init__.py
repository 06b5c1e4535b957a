"""Distill's data-distillation engine (Radosavovic et al., CVPR 2018).

Pure PyTorch / torchvision / pycocotools. Nothing here imports Django or Celery: the web
application calls these modules with plain arguments (paths, dicts, tensors).
"""

__version__ = "0.1.0"
