"""DeCoFlow reproduction kit: continual anomaly detection with decomposed normalizing-flow coupling
subnets (frozen shared base + per-task LoRA adapters)."""
from .model import DeCoFlow
from .official import load_official_state_dict
from .router import PrototypeRouter

__all__ = ["DeCoFlow", "PrototypeRouter", "load_official_state_dict"]
__version__ = "0.1.0"
