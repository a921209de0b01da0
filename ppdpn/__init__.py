"""ppdpn: distributed ImageNet training of DPN and DenseNet in PaddlePaddle."""
__version__ = "0.1.0"
