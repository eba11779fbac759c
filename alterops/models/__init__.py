"""Models of the two papers: AlterNet (Alter-ResNet-50) and its conv-only pre-activation ResNet-50 baseline."""
from .alternet import AlterNet, MSABlock, alternet50
from .preresnet import PreResNet, preresnet50

__all__ = ["AlterNet", "MSABlock", "PreResNet", "alternet50", "preresnet50"]
