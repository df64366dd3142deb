"""DeCoFlow reproduction kit: continual anomaly detection with decomposed normalizing-flow coupling
subnets (frozen shared base + per-task LoRA adapters)."""
from .model import DeCoFlow
from .router import PrototypeRouter

__all__ = ["DeCoFlow", "PrototypeRouter"]
__version__ = "0.1.0"
